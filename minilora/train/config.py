"""TrainConfig: the hyper-parameters of one training run, validated field by field."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from minilora.configs import config_from_dict
from minilora.errors import ConfigError

_INTS = ("batch_size", "max_iters", "warmup_iters", "eval_interval", "eval_iters", "seed")
_FLOATS = ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip")


@dataclass
class TrainConfig:
    """Defaults are nanoGPT's for tiny Shakespeare on a CPU (config/train_shakespeare_char.py with
    the CPU overrides from its README). ``lr_decay_iters`` None means ``max_iters``."""

    batch_size: int = 12
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    seed: int = 1337
    on_nonfinite: str = "raise"

    def __post_init__(self) -> None:
        for name in _INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"TrainConfig.{name} must be a non-negative integer, "
                                  f"got {value!r}")
        for name in ("batch_size", "eval_interval", "eval_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be at least 1, "
                                  f"got {getattr(self, name)}")
        for name in _FLOATS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise ConfigError(f"TrainConfig.{name} must be a finite number >= 0, got {value!r}")
            setattr(self, name, float(value))
        if self.lr <= 0:
            raise ConfigError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.min_lr > self.lr:
            raise ConfigError(f"TrainConfig.min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        for name in ("beta1", "beta2"):
            if not getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be in [0, 1), "
                                  f"got {getattr(self, name)}")
        if self.lr_decay_iters is not None and (
                isinstance(self.lr_decay_iters, bool) or not isinstance(self.lr_decay_iters, int)
                or self.lr_decay_iters < self.warmup_iters):
            raise ConfigError(f"TrainConfig.lr_decay_iters must be an integer >= warmup_iters "
                              f"({self.warmup_iters}), got {self.lr_decay_iters!r}")
        if self.on_nonfinite not in ("raise", "skip"):
            raise ConfigError("TrainConfig.on_nonfinite must be 'raise' or 'skip', "
                              f"got {self.on_nonfinite!r}")

    @property
    def decay_iters(self) -> int:
        """Where the cosine schedule reaches ``min_lr``: ``lr_decay_iters``, or ``max_iters``."""
        decay = self.max_iters if self.lr_decay_iters is None else self.lr_decay_iters
        return max(decay, self.warmup_iters)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> TrainConfig:
        return config_from_dict(cls, d)

"""TrainConfig: the hyper-parameters of one training run, validated field by field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from minilora.configs import (
    choice,
    config_from_dict,
    field_name,
    flag,
    non_negative_int,
    non_negative_number,
    other_field,
    positive_int,
    positive_number,
)
from minilora.errors import ConfigError

_INTS = ("batch_size", "max_iters", "warmup_iters", "eval_interval", "eval_iters", "seed",
         "gradient_accumulation_steps")
_AT_LEAST_ONE = ("batch_size", "eval_interval", "eval_iters", "gradient_accumulation_steps")
_FLOATS = ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip")


@dataclass
class TrainConfig:
    """Defaults are nanoGPT's for tiny Shakespeare on a CPU (config/train_shakespeare_char.py with
    the CPU overrides from its README). ``lr_decay_iters`` None means ``max_iters``.

    ``block_size``: the length of the training (and evaluation) sequences; None means the model's
    own (a GPT's ``block_size``). A Llama has none (rotary positions have no end), so its runs
    set it.

    ``loraplus_lr_ratio``: LoRA+ (``minilora.lora.loraplus``): PEFT's four groups, B and the 1-D
    parameters at ``lr * loraplus_lr_ratio``, ``weight_decay`` as PEFT's loraplus_weight_decay.

    ``gradient_accumulation_steps``: micro-batches of ``batch_size`` per optimizer step (nanoGPT's
    name): the step is the one a batch that many times larger would take, to round-off."""

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
    block_size: int | None = None
    loraplus_lr_ratio: float | None = None  # LoRA+: B at lr * ratio (PEFT's groups); None: off
    gradient_accumulation_steps: int = 1
    activation_checkpointing: bool = False  # recompute each block in backward (same gradients)

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        for name in _INTS:
            check = positive_int if name in _AT_LEAST_ONE else non_negative_int
            setattr(self, name, check(owner, name, getattr(self, name)))
        for name in _FLOATS:
            setattr(self, name, non_negative_number(owner, name, getattr(self, name)))
        if self.lr <= 0:
            raise ConfigError(f"{field_name(owner, 'lr')} must be > 0, got {self.lr}")
        if self.min_lr > self.lr:
            raise ConfigError(f"{field_name(owner, 'min_lr')} ({self.min_lr}) must not exceed "
                              f"{other_field(owner, 'lr')} ({self.lr})")
        for name in ("beta1", "beta2"):
            if not getattr(self, name) < 1:
                raise ConfigError(f"{field_name(owner, name)} must be in [0, 1), "
                                  f"got {getattr(self, name)}")
        if self.lr_decay_iters is not None:
            decay = non_negative_int(owner, "lr_decay_iters", self.lr_decay_iters)
            if decay < self.warmup_iters:
                raise ConfigError(f"{field_name(owner, 'lr_decay_iters')} must be an integer >= "
                                  f"{other_field(owner, 'warmup_iters')} ({self.warmup_iters}), "
                                  f"got {decay}")
            self.lr_decay_iters = decay
        if self.block_size is not None:
            self.block_size = positive_int(owner, "block_size", self.block_size)
        self.on_nonfinite = choice(owner, "on_nonfinite", self.on_nonfinite, ("raise", "skip"))
        if self.loraplus_lr_ratio is not None:
            self.loraplus_lr_ratio = positive_number(owner, "loraplus_lr_ratio",
                                                     self.loraplus_lr_ratio)
        self.activation_checkpointing = flag(owner, "activation_checkpointing",
                                             self.activation_checkpointing)

    @property
    def decay_iters(self) -> int:
        """Where the cosine schedule reaches ``min_lr``: ``lr_decay_iters``, or ``max_iters``."""
        decay = self.max_iters if self.lr_decay_iters is None else self.lr_decay_iters
        return max(decay, self.warmup_iters)

    def extended_to(self, max_iters: int) -> TrainConfig:
        """This run, ending at ``max_iters`` instead: the learning-rate schedule keeps its end
        (``lr_decay_iters``), so the steps already taken are the ones it took, and any beyond
        the old end run at ``min_lr``, as in nanoGPT. A run resumed so equals, bit for bit, one
        that had ``max_iters`` and this ``lr_decay_iters`` from the start."""
        if max_iters == self.max_iters:
            return self
        return dataclasses.replace(self, max_iters=max_iters, lr_decay_iters=self.decay_iters)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> TrainConfig:
        return config_from_dict(cls, d)

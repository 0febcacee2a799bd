"""LoRAConfig: which Linear layers to adapt and how, checked when it is made.

Field names and meanings are Hugging Face PEFT's ``LoraConfig`` (the subset LoRA itself needs), so a
PEFT config reads the same here. Also here: the two rules that turn names into decisions, both
PEFT's, and the scaling ``s`` that every adapted layer multiplies its low-rank path by.

    s = lora_alpha / r                (use_rslora: s = lora_alpha / sqrt(r))
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from minilora.configs import config_from_dict
from minilora.errors import ConfigError

INIT_LORA_WEIGHTS = ("kaiming", "gaussian")
BIAS_MODES = ("none", "all", "lora_only")


# ---- checks shared by LoRAConfig and LoRALinear: each names the owner, field and value ----

def check_rank(owner: str, name: str, value) -> int:
    """A positive integer (bool and float refused: ``r=8.0`` from JSON is a mistake, not an 8)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return int(value)


def check_alpha(owner: str, name: str, value) -> float | int:
    """A finite number > 0; an int stays an int so that ``to_dict`` gives back what came in."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{owner}: {name} must be a number > 0, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{owner}: {name} must be a finite number > 0, got {value!r}")
    return int(value) if isinstance(value, (int, np.integer)) else float(value)


def check_dropout(owner: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0.0 <= value < 1.0:
        raise ConfigError(f"{owner}: lora_dropout must be a number in [0, 1), got {value!r}")
    return float(value)


def check_choice(owner: str, name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{owner}: {name} must be one of {list(choices)}, got {value!r}")
    return value


def check_flag(owner: str, name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{owner}: {name} must be True or False, got {value!r}")
    return bool(value)


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """s = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023).

    A Python float, so that ``s * array`` keeps a float32 array float32.
    """
    return float(lora_alpha) / (math.sqrt(r) if use_rslora else r)


# ---- PEFT's two name rules ------------------------------------------------------------------

def matches_target(name: str, target: str) -> bool:
    """PEFT's rule for a list of targets: the dotted module name equals ``target`` or ends with
    ``"." + target``. So ``c_proj`` matches ``attn.c_proj`` and ``mlp.c_proj``; ``attn.c_proj`` only
    the first; ``proj`` matches neither."""
    return name == target or name.endswith("." + target)


def matches_pattern(name: str, pattern: str) -> bool:
    """PEFT's rule for ``rank_pattern``/``alpha_pattern`` keys: the key, as a regular expression,
    matches the whole name or a dotted suffix of it (``h.0.attn.c_attn`` matches
    ``transformer.h.0.attn.c_attn``; ``h.1.*`` matches every module under ``h.1``)."""
    return name == pattern or re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name) is not None


def _string_list(owner: str, name: str, value, allow_none: bool) -> tuple[str, ...] | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value \
            or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{owner}: {name} must be a non-empty list of non-empty module names, "
                          f"got {value!r}")
    return tuple(value)


def _regex(owner: str, name: str, pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{owner}: {name} {pattern!r} is not a valid regular expression "
                          f"({e})") from None
    return pattern


def _pattern_dict(owner: str, name: str, value, check) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{owner}: {name} must be a mapping of name pattern -> value, "
                          f"got {value!r}")
    out = {}
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{owner}: {name} keys must be non-empty strings, got {key!r}")
        out[_regex(owner, f"{name} key", key)] = check(owner, f"{name}[{key!r}]", v)
    return out


@dataclass(frozen=True)
class LoRAConfig:
    """What to adapt, and how. Checked on creation: a bad field is a ConfigError naming it.

    r: rank of the adapter, ``A: (r, in)``, ``B: (out, r)``.
    lora_alpha: the numerator of the scaling, ``s = lora_alpha / r``.
    use_rslora: rank-stabilised LoRA, ``s = lora_alpha / sqrt(r)``.
    lora_dropout: dropout probability on the adapter's input, ``dropout(x) A^T``.
    target_modules: a list of names, each matching a module whose dotted name equals it or ends with
        ``"." + name`` (PEFT's rule), or one string, a regular expression the whole name must match.
        The default, ``("c_attn",)``, is PEFT's default for GPT-2.
    init_lora_weights: ``"kaiming"`` (PEFT's default, its ``True``: A ~ Kaiming-uniform with
        a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))) or ``"gaussian"`` (A ~ N(0, (1/r)^2), standard
        deviation 1/r, PEFT's reading of the paper);
        B = 0 in both, so a fresh adapter changes nothing.
    bias: which biases train, loralib's meanings: ``"none"``, ``"all"`` (every bias in the model),
        ``"lora_only"`` (the biases of adapted layers). Trained biases are saved with the adapter.
    modules_to_save: modules (same name rule) trained in full and saved with the adapter.
    rank_pattern, alpha_pattern: {name pattern: r or alpha} overriding ``r`` / ``lora_alpha`` for
        the adapted layers a pattern matches (first matching key wins, as in PEFT).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("c_attn",)
    use_rslora: bool = False
    init_lora_weights: str = "kaiming"
    bias: str = "none"
    modules_to_save: tuple[str, ...] | None = None
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None

    def __post_init__(self) -> None:
        owner = "LoRAConfig"
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise ConfigError(f"{owner}: target_modules must not be empty, got {targets!r}")
            targets = _regex(owner, "target_modules", targets)
        else:
            targets = _string_list(owner, "target_modules", targets, allow_none=False)
        checked = {
            "r": check_rank(owner, "r", self.r),
            "lora_alpha": check_alpha(owner, "lora_alpha", self.lora_alpha),
            "lora_dropout": check_dropout(owner, self.lora_dropout),
            "target_modules": targets,
            "use_rslora": check_flag(owner, "use_rslora", self.use_rslora),
            "init_lora_weights": check_choice(owner, "init_lora_weights", self.init_lora_weights,
                                              INIT_LORA_WEIGHTS),
            "bias": check_choice(owner, "bias", self.bias, BIAS_MODES),
            "modules_to_save": _string_list(owner, "modules_to_save", self.modules_to_save,
                                            allow_none=True),
            "rank_pattern": _pattern_dict(owner, "rank_pattern", self.rank_pattern, check_rank),
            "alpha_pattern": _pattern_dict(owner, "alpha_pattern", self.alpha_pattern, check_alpha),
        }
        for name, value in checked.items():  # frozen: normalised values go in through object
            object.__setattr__(self, name, value)

    def rank_and_alpha(self, name: str) -> tuple[int, float | int]:
        """(r, lora_alpha) for the adapted module ``name``: the first ``rank_pattern`` /
        ``alpha_pattern`` key that matches it, else ``r`` / ``lora_alpha``."""
        ranks, alphas = (self.rank_pattern or {}).items(), (self.alpha_pattern or {}).items()
        r = next((v for k, v in ranks if matches_pattern(name, k)), self.r)
        alpha = next((v for k, v in alphas if matches_pattern(name, k)), self.lora_alpha)
        return r, alpha

    def to_dict(self) -> dict:
        """A JSON-ready dict (lists, not tuples); ``LoRAConfig.from_dict(c.to_dict()) == c``."""
        d = dataclasses.asdict(self)
        for name in ("target_modules", "modules_to_save"):
            if isinstance(d[name], tuple):
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d) -> LoRAConfig:
        """The config saved by ``to_dict`` (e.g. read from an adapter's JSON). Missing fields take
        their defaults; an unknown field or a value of the wrong type is a ConfigError naming it."""
        return config_from_dict(cls, d)

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

from minilora.configs import (
    choice,
    config_from_dict,
    field_name,
    flag,
    positive_int,
    positive_number,
    probability,
)
from minilora.errors import ConfigError
from minilora.lora.residual_init import PISSA_NITER, RESIDUAL_INITS, refuse_pissa_niter

INIT_LORA_WEIGHTS = ("kaiming", "gaussian", "pissa", "olora")
BIAS_MODES = ("none", "all", "lora_only")
TASK_TYPES = ("CAUSAL_LM",)  # PEFT's task_type for a language model, the one minilora has
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every Linear but the output layer


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
        raise ConfigError(f"{field_name(owner, name)} must be a non-empty list of non-empty "
                          "module names, "
                          f"got {value!r}")
    return tuple(value)


def _regex(owner: str, name: str, pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{field_name(owner, name)} {pattern!r} is not a valid regular "
                          "expression "
                          f"({e})") from None
    return pattern


def _pattern_dict(owner: str, name: str, value, check) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{field_name(owner, name)} must be a mapping of name pattern -> value, "
                          f"got {value!r}")
    out = {}
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{field_name(owner, name)} keys must be non-empty strings, "
                              f"got {key!r}")
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
        ``"." + name`` (PEFT's rule), or one string, a regular expression the whole name must match,
        or ``"all-linear"`` (PEFT's shorthand: every Linear except the model's output layer).
        The default, ``("c_attn",)``, is PEFT's default for GPT-2.
    init_lora_weights: ``"kaiming"`` (PEFT's default, which PEFT spells ``True``: A ~
        Kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))) or ``"gaussian"``
        (A ~ N(0, (1/r)^2), standard deviation 1/r, PEFT's reading of the paper); B = 0 in both,
        so a fresh adapter changes nothing. ``True`` is read as ``"kaiming"``. ``"pissa"`` and
        ``"olora"`` (PEFT's): A and B from the SVD or QR of W, and W replaced by the residual
        ``W - s B A``, so a fresh adapter changes nothing either (``lora/residual_init.py``; an
        Embedding gets the plain initialisation, as in PEFT). PEFT's ``"pissa_niter_K"`` is
        refused by name (no randomized SVD with its meaning in scipy).
    bias: which biases train, loralib's meanings: ``"none"``, ``"all"`` (every bias in the model),
        ``"lora_only"`` (the biases of adapted layers). Trained biases are saved with the adapter.
    modules_to_save: modules (same name rule) trained in full and saved with the adapter.
    rank_pattern, alpha_pattern: {name pattern: r or alpha} overriding ``r`` / ``lora_alpha`` for
        the adapted layers a pattern matches (first matching key wins, as in PEFT).
    task_type: PEFT's task, None or ``"CAUSAL_LM"`` (the only task minilora's models do).
    fan_in_fan_out: PEFT's flag for layers that store W as (in, out), as GPT-2's ``Conv1D`` does.
        minilora's Linear is always (out, in), so it changes nothing here; the PEFT file reader and
        writer (``minilora.hf``) set it from the Hugging Face layer type, as PEFT does.
    ensure_weight_tying: PEFT's switch for tied weights in ``modules_to_save`` (GPT-2's
        ``lm_head`` is ``transformer.wte``). minilora trains a module in place, so the tie always
        holds; a config that names a tied module must say so with True (PEFT would otherwise train
        an untied copy, other numbers), or ``apply_lora`` refuses it.
    target_slices: {module name: slice names} adapting only those slices of a fused projection's
        output, each with its own rank-r adapter: ``{"c_attn": ["q", "v"]}`` adapts GPT-2's query
        and value and leaves the key alone, as the LoRA paper does (loralib's ``MergedLinear``).
        Keys follow ``target_modules``' list rule and name adapted modules; the slice names are
        the model's (``GPT.fused_projections``). Not a PEFT field: a PEFT file holds such an
        adapter as a full one of rank k r (docs/adapters.md).
    use_dora: DoRA (Liu et al., 2024), PEFT's field: each adapted Linear also trains a magnitude
        m: (out,), PEFT's ``lora_magnitude_vector``, and computes
        ``m / ||W + s B A||_row * (W + s B A) x + b`` (the norm detached; docs/variants.md).
        Linear layers only, not with ``target_slices``.
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
    task_type: str | None = None
    fan_in_fan_out: bool = False
    ensure_weight_tying: bool = False
    target_slices: dict[str, tuple[str, ...]] | None = None
    use_dora: bool = False

    def __post_init__(self) -> None:
        owner = "LoRAConfig"
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise ConfigError(f"{field_name(owner, 'target_modules')} must not be empty, "
                                  f"got {targets!r}")
            targets = ALL_LINEAR if targets.lower() == ALL_LINEAR else \
                _regex(owner, "target_modules", targets)
        else:
            targets = _string_list(owner, "target_modules", targets, allow_none=False)
        checked = {
            "r": positive_int(owner, "r", self.r),
            "lora_alpha": positive_number(owner, "lora_alpha", self.lora_alpha),
            "lora_dropout": probability(owner, "lora_dropout", self.lora_dropout),
            "target_modules": targets,
            "use_rslora": flag(owner, "use_rslora", self.use_rslora),
            "init_lora_weights": _init_method(owner, self.init_lora_weights),
            "bias": choice(owner, "bias", self.bias, BIAS_MODES),
            "modules_to_save": _string_list(owner, "modules_to_save", self.modules_to_save,
                                            allow_none=True),
            "rank_pattern": _pattern_dict(owner, "rank_pattern", self.rank_pattern, positive_int),
            "alpha_pattern": _pattern_dict(owner, "alpha_pattern", self.alpha_pattern,
                                           positive_number),
            "task_type": None if self.task_type is None else choice(
                owner, "task_type", self.task_type, TASK_TYPES),
            "fan_in_fan_out": flag(owner, "fan_in_fan_out", self.fan_in_fan_out),
            "ensure_weight_tying": flag(owner, "ensure_weight_tying", self.ensure_weight_tying),
            "target_slices": _slices_dict(owner, self.target_slices),
            "use_dora": flag(owner, "use_dora", self.use_dora),
        }
        if checked["init_lora_weights"] in RESIDUAL_INITS and checked["target_slices"]:
            raise ConfigError(f"{field_name(owner, 'init_lora_weights')}="
                              f"{checked['init_lora_weights']!r} factors a whole weight; it does "
                              "not combine with target_slices")
        if checked["use_dora"] and checked["target_slices"]:
            raise ConfigError(f"{field_name(owner, 'use_dora')}: DoRA on slices of a fused output "
                              "(target_slices) is not implemented; PEFT has no such adapter")
        if checked["use_dora"] and checked["init_lora_weights"] in RESIDUAL_INITS:
            raise ConfigError(f"{field_name(owner, 'use_dora')}: DoRA with "
                              f"init_lora_weights={checked['init_lora_weights']!r} is not "
                              "implemented; use one or the other")
        for name, value in checked.items():  # frozen: normalised values go in through object
            object.__setattr__(self, name, value)

    def rank_and_alpha(self, name: str) -> tuple[int, float | int]:
        """(r, lora_alpha) for the adapted module ``name``: the first ``rank_pattern`` /
        ``alpha_pattern`` key that matches it, else ``r`` / ``lora_alpha``."""
        ranks, alphas = (self.rank_pattern or {}).items(), (self.alpha_pattern or {}).items()
        r = next((v for k, v in ranks if matches_pattern(name, k)), self.r)
        alpha = next((v for k, v in alphas if matches_pattern(name, k)), self.lora_alpha)
        return r, alpha

    def slices_for(self, name: str) -> tuple[str, ...] | None:
        """The slices ``target_slices`` adapts in the module ``name`` (the first key that
        matches it), or None: the whole module."""
        return next((v for k, v in (self.target_slices or {}).items()
                     if matches_target(name, k)), None)

    def to_dict(self) -> dict:
        """A JSON-ready dict (lists, not tuples); ``LoRAConfig.from_dict(c.to_dict()) == c``."""
        d = dataclasses.asdict(self)
        for name in ("target_modules", "modules_to_save"):
            if isinstance(d[name], tuple):
                d[name] = list(d[name])
        if d["target_slices"] is not None:
            d["target_slices"] = {k: list(v) for k, v in d["target_slices"].items()}
        return d

    @classmethod
    def from_dict(cls, d) -> LoRAConfig:
        """The config saved by ``to_dict`` (e.g. read from an adapter's JSON). Missing fields take
        their defaults; an unknown field or a value of the wrong type is a ConfigError naming it."""
        return config_from_dict(cls, d)

    @classmethod
    def from_peft(cls, d) -> LoRAConfig:
        """The config a PEFT ``adapter_config.json`` (or ``LoraConfig.to_dict()``) describes; a
        field minilora does not implement, set to other than PEFT's default, is a ConfigError
        naming it. See [`minilora.lora.peft_config`][]."""
        from minilora.lora.peft_config import lora_config_from_peft

        return lora_config_from_peft(d)

    def to_peft(self) -> dict:
        """Every field of PEFT's ``LoraConfig``, as its ``adapter_config.json`` holds them."""
        from minilora.lora.peft_config import peft_dict

        return peft_dict(self)


def _slices_dict(owner: str, value) -> dict[str, tuple[str, ...]] | None:
    """{module name: distinct slice names}, each list non-empty; None stays None."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{field_name(owner, 'target_slices')} must be a non-empty mapping of "
                          f"module name -> slice names (e.g. {{'c_attn': ['q', 'v']}}), got "
                          f"{value!r:.80}")
    out = {}
    for key, names in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{field_name(owner, 'target_slices')} keys must be non-empty "
                              f"module names, got {key!r}")
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names \
                or not all(isinstance(n, str) and n for n in names) or len(set(names)) < len(names):
            raise ConfigError(f"{field_name(owner, 'target_slices')}[{key!r}] must be a non-empty "
                              f"list of distinct slice names, got {names!r:.80}")
        out[key] = tuple(names)
    return out


def _init_method(owner: str, value) -> str:
    """PEFT spells Kaiming-uniform A ``True``; minilora ``"kaiming"``. PEFT's ``False`` (B drawn
    too, so a fresh adapter is not the identity) is not implemented."""
    if value is True or (isinstance(value, np.bool_) and value):
        return "kaiming"
    if isinstance(value, str) and value in INIT_LORA_WEIGHTS:
        return value
    if isinstance(value, str) and PISSA_NITER.fullmatch(value):
        refuse_pissa_niter(field_name(owner, "init_lora_weights"), value)
    why = " (PEFT's False, a random B, is not implemented)" if value is False else ""
    raise ConfigError(f"{field_name(owner, 'init_lora_weights')} must be True (PEFT's spelling "
                      f"of 'kaiming'), 'kaiming', 'gaussian', 'pissa' or 'olora', got "
                      f"{value!r}{why}")


# A regular expression from a file could take exponential time to match (``(.*)*z`` took 18 s per
# module name here): patterns read from a file must not repeat a group and may hold at most a few
# repetitions, which every pattern PEFT's docs show (``.*\.attn\.c_attn``,
# ``h\.\d+\.attn\.(c_attn|c_proj)``) satisfies; such patterns match a module name in linear time.
MAX_PATTERN_REPEATS = 4
_REPEATED_GROUP = re.compile(r"\)(?:[*+?]|\{\d)")
_REPEAT = re.compile(r"(?<!\\)(?:[*+]|\{\d+,\d*\})")


def slow_patterns(config: LoRAConfig) -> list[tuple[str, str]]:
    """(field, pattern) for each regular expression in ``config`` that a file may not hold: one
    that repeats a group, holds more than MAX_PATTERN_REPEATS repetitions or 200 characters."""
    patterns = [("target_modules", config.target_modules)] if isinstance(
        config.target_modules, str) and config.target_modules != ALL_LINEAR else []
    for field in ("rank_pattern", "alpha_pattern"):
        patterns += [(f"{field} key", k) for k in (getattr(config, field) or {})]
    return [(where, pattern) for where, pattern in patterns
            if len(pattern) > 200 or _REPEATED_GROUP.search(pattern)
            or len(_REPEAT.findall(pattern)) > MAX_PATTERN_REPEATS]

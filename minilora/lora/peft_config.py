"""PEFT's ``LoraConfig``, field by field, and minilora's ``LoRAConfig`` read from and written as it.

Every field of PEFT 0.21's ``LoraConfig`` falls in one of three groups (the tests hold the groups
equal to PEFT's own list of fields and defaults; ``MINILORA_ONLY`` lists the one ``LoRAConfig``
field PEFT lacks):

- ``MAPPED``: a ``LoRAConfig`` field of the same name and meaning;
- ``DESCRIPTIVE``: facts about the file or PEFT's runtime (its version, the base model's name,
  inference mode), which change no number: read, checked for type, not kept;
- ``REFUSED``: a PEFT feature minilora does not implement (``layers_to_transform``, ...),
  accepted only at PEFT's default, otherwise a ConfigError naming it.

A field PEFT 0.21 does not know is accepted only when it is empty (None, False, ``{}``, ``[]``),
which is how a newer PEFT writes a feature nobody used.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

from minilora.errors import ConfigError
from minilora.lora.config import LoRAConfig
from minilora.lora.residual_init import PISSA_NITER, RESIDUAL_INITS, refuse_pissa_niter

PEFT_VERSION = "0.21.2"  # the PEFT whose LoraConfig this table follows

# name -> PEFT's default; the LoRAConfig field of the same name means the same
MAPPED = {
    "r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": None, "use_rslora": False,
    "init_lora_weights": True, "bias": "none", "modules_to_save": None, "rank_pattern": {},
    "alpha_pattern": {}, "task_type": None, "fan_in_fan_out": False, "ensure_weight_tying": False,
    "use_dora": False,
}

# LoRAConfig fields PEFT does not have: a PEFT file holds what they describe in PEFT's own terms
# (target_slices: an adapter on slices of a fused output is written as a full one of rank k r)
MINILORA_ONLY = ("target_slices",)

# name -> (PEFT's default, the JSON types it may hold): facts that change no number
DESCRIPTIVE = {
    "peft_type": ("LORA", (str,)),
    "auto_mapping": (None, (dict, type(None))),
    "peft_version": (PEFT_VERSION, (str, type(None))),
    "base_model_name_or_path": (None, (str, type(None))),
    "revision": (None, (str, type(None))),
    "inference_mode": (False, (bool,)),
    "megatron_core": ("megatron.core", (str, type(None))),  # used only with megatron_config
    "qalora_group_size": (16, (int,)),  # used only with use_qalora
}

# name -> PEFT's default: features minilora does not implement
REFUSED = {
    "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
    "megatron_config": None, "trainable_token_indices": None, "loftq_config": {},
    "eva_config": None, "corda_config": None, "lora_ga_config": None,
    "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False,
    "monteclora_config": None, "layer_replication": None, "lora_bias": False,
    "target_parameters": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
}

# PEFT's init_lora_weights values that only draw A and B: a file's weights replace them. PiSSA
# and OLoRA also replace W by its residual, which a file does not hold: read, they run on the
# model the file is loaded into, as PEFT's from_pretrained runs them, then the file's A, B load
_INITS_OF_A_AND_B = (True, False, "gaussian")


def _plain(value):
    """A value of ``LoraConfig.to_dict()`` as its JSON file holds it: an enum's value (PEFT's
    ``TaskType.CAUSAL_LM``), a set (its target_modules) as a sorted list."""
    if isinstance(value, Enum):
        return value.value
    return sorted(value) if isinstance(value, (set, frozenset)) else value


def _empty(value) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list)) and not value)


def lora_config_from_peft(d, weights_follow: bool = False) -> LoRAConfig:
    """The LoRAConfig a PEFT config dict (``adapter_config.json``, or ``LoraConfig.to_dict()``)
    describes.

    weights_follow: the adapter's weights come from a file, so how PEFT would have drawn A and B
        does not matter: ``init_lora_weights=False`` (a random B) is read as ``"kaiming"``.
    A REFUSED field away from its default, a DESCRIPTIVE field of the wrong type, another
    ``peft_type``, an unknown non-empty field: a ConfigError naming it.
    """
    owner = "PEFT config"
    if not isinstance(d, Mapping):
        raise ConfigError(f"{owner}: expected a JSON object of fields, got {type(d).__name__}")
    if _plain(d.get("peft_type")) != "LORA":
        raise ConfigError(f"{owner}: peft_type must be 'LORA' (minilora reads LoRA adapters), got "
                          f"{_plain(d.get('peft_type'))!r}")
    fields = {}
    for name, value in ((k, _plain(v)) for k, v in d.items()):
        if name in MAPPED:
            fields[name] = value
        elif name in DESCRIPTIVE:
            types = DESCRIPTIVE[name][1]
            if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                raise ConfigError(f"{owner}: {name} must be of type "
                                  f"{' or '.join(t.__name__ for t in types)}, got {value!r:.60}")
        elif name in REFUSED:
            if value != REFUSED[name] and not (_empty(value) and _empty(REFUSED[name])):
                raise ConfigError(f"{owner}: {name}={value!r:.60} is a PEFT feature minilora does "
                                  f"not implement (only the default {REFUSED[name]!r} is accepted)")
        elif not _empty(value):
            raise ConfigError(f"{owner}: unknown field {name!r} (set to {value!r:.60}); minilora "
                              f"reads PEFT {PEFT_VERSION}'s LoraConfig fields")
    return LoRAConfig(**_lora_fields(owner, fields, weights_follow))


def _lora_fields(owner: str, fields: dict, weights_follow: bool) -> dict:
    """PEFT's spellings turned into LoRAConfig's: {} patterns are None, None targets the default."""
    init = fields.get("init_lora_weights", True)
    if isinstance(init, str) and PISSA_NITER.fullmatch(init):
        refuse_pissa_niter(f"{owner}: init_lora_weights", init)
    if isinstance(init, (bool, str)) and init not in _INITS_OF_A_AND_B \
            and init not in ("kaiming", *RESIDUAL_INITS):
        raise ConfigError(f"{owner}: init_lora_weights={init!r} (an initialisation that needs "
                          "data or another method) is not implemented; minilora reads True, "
                          "False, 'gaussian', 'pissa' and 'olora'")
    if init is False and weights_follow:
        fields["init_lora_weights"] = "kaiming"
    for name in ("rank_pattern", "alpha_pattern"):
        if fields.get(name) == {}:
            fields[name] = None
    if fields.get("target_modules", ()) is None:
        del fields["target_modules"]  # PEFT's default for GPT-2, c_attn, is minilora's
    for name in ("target_modules", "modules_to_save"):
        if isinstance(fields.get(name), list):
            fields[name] = tuple(fields[name])
    return fields


def peft_dict(config: LoRAConfig) -> dict:
    """Every field PEFT's ``save_pretrained`` writes to ``adapter_config.json``, sorted as it
    sorts them: the MAPPED ones from ``config``, the others at PEFT's defaults."""
    if not isinstance(config, LoRAConfig):
        raise ConfigError(f"peft_dict: expected a LoRAConfig, got {type(config).__name__}")
    out = {name: default for name, (default, _) in DESCRIPTIVE.items()}
    out.update(REFUSED)
    for name in MAPPED:
        value = getattr(config, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    out["init_lora_weights"] = True if config.init_lora_weights == "kaiming" else \
        config.init_lora_weights
    for name in ("rank_pattern", "alpha_pattern"):
        out[name] = dict(out[name] or {})
    out["loftq_config"] = {}
    return dict(sorted(out.items()))

"""Dataclass configs read back from JSON: the one check GPTConfig, LoRAConfig and TrainConfig make.

Each config checks its own values on creation (``__post_init__``); what they share is the step
before that: the JSON must be an object, and every key one of the config's fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from minilora.errors import ConfigError


def config_from_dict(cls, d, required: Iterable[str] = ()):
    """``cls(**d)`` for a dataclass ``cls``, after checking ``d``: a ConfigError names what is
    wrong (not a JSON object, unknown fields with the known ones listed, missing ``required``
    fields) before a field's own check runs. Fields not in ``d`` take their defaults."""
    name = cls.__name__
    if not isinstance(d, Mapping):
        raise ConfigError(f"{name}: expected a JSON object of fields, got {type(d).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in d if key not in known]
    if unknown:
        raise ConfigError(f"{name}: unknown fields {unknown}; the fields are {known}")
    missing = [key for key in required if key not in d]
    if missing:
        raise ConfigError(f"{name}: missing fields {missing}")
    return cls(**d)

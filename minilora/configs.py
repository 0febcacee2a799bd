"""Checking settings: one helper per rule, and configs read back from JSON.

Every check of a setting in minilora (a config's field, a layer's size, a dropout probability) goes
through one of the helpers below, so the same rule always reads the same. Each raises a
[`ConfigError`][] that names the field, what was expected and what came. A field is named as
[`field_name`][] says: ``GPTConfig.n_embd`` by default; the ``minilora`` command, inside
[`naming_fields`][], has the same checks name its flags (``--n-embd``) instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np

from minilora.errors import ConfigError

Namer = Callable[[str, str], "str | None"]  # (owner, field) -> another name for it, or None

_namer: contextvars.ContextVar[Namer] = contextvars.ContextVar(
    "minilora_field_namer", default=lambda owner, field: None)


def field_name(owner: str, field: str) -> str:
    """How an error message names ``owner``'s ``field``: ``LoRAConfig.r``, or as
    [`naming_fields`][] says."""
    return _namer.get()(owner, field) or f"{owner}.{field}"


def other_field(owner: str, field: str) -> str:
    """How a message about one field names another of the same owner: ``n_head``, or as
    [`naming_fields`][] says."""
    return _namer.get()(owner, field) or field


@contextlib.contextmanager
def naming_fields(namer: Namer) -> Iterator[None]:
    """Inside, the checks name a field by ``namer(owner, field)`` where it gives a name (the
    command line: a flag), as by default where it gives None."""
    token = _namer.set(namer)
    try:
        yield
    finally:
        _namer.reset(token)


def _is_int(value) -> bool:  # bool and float refused: ``r=8.0`` from JSON is a mistake, not an 8
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return _is_int(value) or isinstance(value, (float, np.floating))


def positive_int(owner: str, field: str, value) -> int:
    """An integer >= 1, as a Python int."""
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{field_name(owner, field)} must be a positive integer, got {value!r}")
    return int(value)


def non_negative_int(owner: str, field: str, value) -> int:
    """An integer >= 0, as a Python int."""
    if not _is_int(value) or value < 0:
        raise ConfigError(f"{field_name(owner, field)} must be a non-negative integer, "
                          f"got {value!r}")
    return int(value)


def probability(owner: str, field: str, value) -> float:
    """A number in [0, 1) (a dropout probability), as a Python float."""
    if not _is_number(value) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{field_name(owner, field)} must be a number in [0, 1), got {value!r}")
    return float(value)


def positive_number(owner: str, field: str, value) -> float | int:
    """A finite number > 0; an int stays an int, so that a config's ``to_dict`` gives back what
    came in."""
    if not _is_number(value) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{field_name(owner, field)} must be a finite number > 0, got {value!r}")
    return int(value) if _is_int(value) else float(value)


def non_negative_number(owner: str, field: str, value) -> float:
    """A finite number >= 0, as a Python float (an np.float64 would promote float32 arrays)."""
    if not _is_number(value) or not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{field_name(owner, field)} must be a finite number >= 0, got {value!r}")
    return float(value)


def choice(owner: str, field: str, value, choices: Iterable[str]) -> str:
    """One of ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{field_name(owner, field)} must be one of {list(choices)}, "
                          f"got {value!r}")
    return value


def flag(owner: str, field: str, value) -> bool:
    """True or False (not 0, 1 or "yes"), as a Python bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{field_name(owner, field)} must be True or False, got {value!r}")
    return bool(value)


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

"""Strict JSON: configs, tokenizers and metadata written atomically and read with every fault
(bad UTF-8, bad syntax, NaN, duplicate keys, deep nesting, wrong types) turned into a
FileFormatError naming the file; JSON-lines logs that survive a crash; generator states.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from minilora.errors import ConfigError, FileFormatError
from minilora.io.atomic import read_bytes, write_atomic_text

MAX_JSON_BYTES = 64 * 1024 * 1024


def strict_loads(text: str):
    """json.loads that refuses NaN/Infinity, numbers too large for a float (``1e400``, which
    json.loads reads as infinity) and duplicate keys (ValueError, RecursionError)."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants,
                      parse_float=_finite_float)


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range for a float")
    return value


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def dumps_json(obj, indent: int | None = 2) -> str:
    """Strict JSON text (no NaN or infinity; numpy scalars become Python numbers)."""
    try:
        return json.dumps(obj, indent=indent, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot write as JSON: {e}") from None


def save_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as strict JSON, atomically."""
    try:
        text = dumps_json(obj)
    except ConfigError as e:
        raise ConfigError(f"save_json({path}): {e}") from None
    write_atomic_text(path, text + "\n")


def check_schema(obj, schema, where: str = "$") -> None:
    """Check a parsed JSON value against a small schema; raises ConfigError naming the place.

    schema: a type or tuple of types (``int`` excludes bool; ``float`` accepts int), a dict
    ``{key: schema}`` (an object with these keys; a key ending in ``?`` is optional; other keys are
    allowed), a one-element list ``[schema]`` (a list of such items), or None (anything).
    """
    if schema is None:
        return
    if isinstance(schema, dict):
        if not isinstance(obj, dict):
            raise ConfigError(f"{where}: expected an object, got {_json_type(obj)}")
        for key, sub in schema.items():
            optional = key.endswith("?")
            key = key[:-1] if optional else key
            if key not in obj:
                if optional:
                    continue
                raise ConfigError(f"{where}: missing key {key!r}")
            check_schema(obj[key], sub, f"{where}.{key}")
        return
    if isinstance(schema, list):
        if not isinstance(obj, list):
            raise ConfigError(f"{where}: expected a list, got {_json_type(obj)}")
        for i, item in enumerate(obj):
            check_schema(item, schema[0], f"{where}[{i}]")
        return
    types = schema if isinstance(schema, tuple) else (schema,)
    if not any(_is_json_type(obj, t) for t in types):
        names = " or ".join(t.__name__ for t in types)
        raise ConfigError(f"{where}: expected {names}, got {_json_type(obj)} {obj!r:.40}")


def _is_json_type(obj, t) -> bool:
    if t is int:
        return isinstance(obj, int) and not isinstance(obj, bool)
    if t is float:
        return isinstance(obj, (int, float)) and not isinstance(obj, bool)
    return isinstance(obj, t)


def _json_type(obj) -> str:
    return {dict: "object", list: "list", str: "str", bool: "bool", int: "int", float: "float",
            type(None): "null"}.get(type(obj), type(obj).__name__)


def load_json(path: str | os.PathLike, schema=None):
    """Parse a JSON file strictly (UTF-8, no NaN, no duplicate keys) and check it against
    ``schema`` (see [`check_schema`][]). Anything wrong is a FileFormatError naming the file."""
    raw = read_bytes(path, "JSON", MAX_JSON_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path}: not UTF-8 at byte {e.start}") from None
    try:
        obj = strict_loads(text)
    except RecursionError:
        raise FileFormatError(f"{path}: JSON nested too deeply") from None
    except ValueError as e:
        raise FileFormatError(f"{path}: not valid JSON: {e}") from None
    try:
        check_schema(obj, schema)
    except ConfigError as e:
        raise FileFormatError(f"{path}: {e}") from None
    return obj


def append_jsonl(path: str | os.PathLike, obj) -> None:
    """Append ``obj`` as one JSON line with a single ``write`` and fsync it: a crash leaves the line
    whole or absent (at worst a torn last line, which [`read_jsonl`][] drops)."""
    line = (dumps_json(obj, indent=None) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike) -> list:
    """The objects of a JSON-lines file; a last line without its newline (torn by a crash) is
    dropped; any other bad line is a FileFormatError naming the line."""
    raw = read_bytes(path, "JSON-lines")
    lines = raw.split(b"\n")
    lines = lines[:-1]  # after the last newline: empty, or a torn line
    out = []
    for i, line in enumerate(lines, 1):
        try:
            out.append(strict_loads(line.decode("utf-8")))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise FileFormatError(f"{path}: line {i} is not valid JSON ({e})") from None
    return out


# ---- random generators: bit-identical resume needs their exact state -------------------
_BIT_GENERATORS = ("PCG64", "PCG64DXSM")  # the ones whose state is plain JSON (no arrays)
_STATE_SCHEMA = {"bit_generator": str, "state": {"state": int, "inc": int}, "has_uint32": int,
                 "uinteger": int}


def generator_state(rng: np.random.Generator) -> dict:
    """The JSON-able state of ``rng`` (its bit generator's state dict, big integers included)."""
    return json.loads(json.dumps(rng.bit_generator.state))


def restore_generator(state, source: str = "generator state") -> np.random.Generator:
    """A Generator that continues exactly where the one ``generator_state`` saved left off.

    A damaged or hostile state is a FileFormatError naming ``source``.
    """
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if name not in _BIT_GENERATORS:
        raise FileFormatError(f"{source}: expected the state of one of {_BIT_GENERATORS}, got "
                              f"{name!r}")
    try:  # exactly the fields numpy writes, as integers in range: numpy itself takes a bool
        check_schema(state, _STATE_SCHEMA, source)
    except ConfigError as e:
        raise FileFormatError(str(e)) from None
    inner = state["state"]
    if set(state) != set(_STATE_SCHEMA) or set(inner) != {"state", "inc"} \
            or not all(0 <= inner[k] < 2**128 for k in inner) \
            or state["has_uint32"] not in (0, 1) or not 0 <= state["uinteger"] < 2**32:
        raise FileFormatError(f"{source}: damaged {name} state (a field missing, unknown or out "
                              "of range)")
    bit_generator = getattr(np.random, name)()
    try:
        bit_generator.state = state
    except Exception as e:  # numpy raises TypeError, ValueError, KeyError, OverflowError here
        raise FileFormatError(f"{source}: damaged {name} state ({type(e).__name__}: {e})") \
            from None
    return np.random.Generator(bit_generator)

"""Tensor files: safetensors written with ``safetensors.numpy`` and read back only after the header
has been checked field by field, plus ``.npz`` read with ``allow_pickle=False``.

Every file :func:`save_tensors` writes carries a SHA-256 of its tensors and metadata in the
safetensors metadata (``minilora.sha256``), so a bit flipped anywhere, header or data, is found.
Whatever is wrong with a file, reading it raises a FileFormatError naming the file and the fault.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors.numpy

from minilora.errors import ConfigError, FileFormatError
from minilora.io.atomic import read_bytes, write_atomic_bytes
from minilora.io.jsonio import strict_loads

CHECKSUM_KEY = "minilora.sha256"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

# safetensors dtype names <-> numpy dtypes (little-endian), the ones numpy can hold
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
_NATIVE = {np.dtype(v).newbyteorder("=") for v in _DTYPES.values()}


def _digest(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, and every metadata entry."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = tensors[name]
        frame = json.dumps([name, a.dtype.str, list(a.shape), a.nbytes])
        h.update(frame.encode("utf-8"))
        h.update(a.tobytes(order="C"))
    for key in sorted(k for k in metadata if k != CHECKSUM_KEY):
        h.update(json.dumps([key, metadata[key]]).encode("utf-8"))
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> array) and string ``metadata`` to a safetensors file, atomically.

    Arrays are stored little-endian and C-contiguous, dtype kept; the metadata gains
    ``minilora.sha256`` so that :func:`load_tensors` can find any damage.
    """
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str) or key == CHECKSUM_KEY:
            raise ConfigError(f"save_tensors({path}): metadata must map str to str (and not use "
                              f"{CHECKSUM_KEY!r}), got {key!r}: {type(value).__name__}")
    arrays = {}
    for name, a in tensors.items():
        if not isinstance(name, str) or not isinstance(a, np.ndarray):
            raise ConfigError(f"save_tensors({path}): expected str -> ndarray, got "
                              f"{type(name).__name__} -> {type(a).__name__} for {name!r}")
        if a.dtype.newbyteorder("=") not in _NATIVE:
            raise ConfigError(f"save_tensors({path}): {name!r} has dtype {a.dtype}, which "
                              f"safetensors cannot hold")
        arrays[name] = np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")  # keeps 0-d
    metadata[CHECKSUM_KEY] = _digest(arrays, metadata)
    write_atomic_bytes(path, safetensors.numpy.save(arrays, metadata=metadata))


def _parse_header(path: Path, raw: bytes) -> tuple[dict, dict[str, str], int]:
    """Check a safetensors header completely: (tensor entries, metadata, start of the data)."""
    if len(raw) < 8:
        raise FileFormatError(f"{path}: truncated: {len(raw)} bytes, a safetensors file has at "
                              f"least 8")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES or n > len(raw) - 8:
        raise FileFormatError(f"{path}: header length {n} exceeds the file's {len(raw) - 8} "
                              f"remaining bytes (truncated or damaged)")
    try:
        header = strict_loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FileFormatError(f"{path}: damaged header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{path}: damaged header: expected a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FileFormatError(f"{path}: damaged header: __metadata__ must map str to str")
    data_len = len(raw) - 8 - n
    spans = []
    for name, entry in header.items():
        ok = (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}
              and entry["dtype"] in _DTYPES and isinstance(entry["shape"], list)
              and all(_is_count(d) for d in entry["shape"])
              and isinstance(entry["data_offsets"], list) and len(entry["data_offsets"]) == 2
              and all(_is_count(o) for o in entry["data_offsets"]))
        if not ok:
            raise FileFormatError(f"{path}: damaged header: bad entry for tensor {name!r}")
        begin, end = entry["data_offsets"]
        size = math.prod(entry["shape"]) * np.dtype(_DTYPES[entry["dtype"]]).itemsize
        if end - begin != size or end > data_len:
            raise FileFormatError(f"{path}: tensor {name!r} needs {size} bytes at {begin}..{end}, "
                                  f"the file holds {data_len} bytes of data (truncated or damaged)")
        spans.append((begin, end))
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise FileFormatError(f"{path}: damaged header: tensor data overlaps or leaves a gap "
                                  f"at byte {covered}")
        covered = end
    if covered != data_len:
        raise FileFormatError(f"{path}: {data_len - covered} bytes after the last tensor "
                              f"(damaged or not a safetensors file)")
    return header, metadata, 8 + n


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _load_safetensors(path: Path, require_checksum: bool) -> tuple[dict, dict[str, str]]:
    raw = read_bytes(path, "safetensors")
    _, metadata, _ = _parse_header(path, raw)
    try:
        tensors = {k: np.array(v) for k, v in safetensors.numpy.load(raw).items()}
    except Exception as e:  # safetensors' own errors (SafetensorError, ...) wrapped, never leaked
        raise FileFormatError(f"{path}: safetensors refused the file: {e}") from None
    saved = metadata.get(CHECKSUM_KEY)
    if saved is None:
        if require_checksum:
            raise FileFormatError(f"{path}: no {CHECKSUM_KEY} in the metadata: not written by "
                                  f"minilora, or damaged")
    elif saved != _digest(tensors, metadata):
        raise FileFormatError(f"{path}: checksum mismatch: the file is damaged")
    return tensors, {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        read_bytes(path, "npz")  # raises the right error for missing / directory
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: np.array(npz[k]) for k in npz.files}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise FileFormatError(f"{path}: holds object arrays, which need pickle; refused") \
                from None
        raise FileFormatError(f"{path}: damaged npz file: {e}") from None
    except Exception as e:  # BadZipFile, zlib.error, EOFError, ...: whatever numpy's reader raises
        raise FileFormatError(f"{path}: damaged npz file: {type(e).__name__}: {e}") from None


def load_tensors(path: str | os.PathLike, require_checksum: bool = True) -> dict[str, np.ndarray]:
    """name -> array from a safetensors file (or, by suffix, an ``.npz`` without pickle).

    Arrays are fresh writable copies, dtype as stored. ``require_checksum=False`` also accepts
    safetensors files from other tools (no ``minilora.sha256``; verified if present).
    """
    path = Path(path)
    if path.suffix == ".npz":
        return _load_npz(path)
    return _load_safetensors(path, require_checksum)[0]


def load_metadata(path: str | os.PathLike, require_checksum: bool = True) -> dict[str, str]:
    """The string metadata saved by :func:`save_tensors` (the checksum entry left out)."""
    return _load_safetensors(Path(path), require_checksum)[1]


def check_tensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                  expected: Mapping[str, tuple], allow_extra: bool = False) -> None:
    """Check loaded ``tensors`` against ``expected``: name -> (shape, dtype).

    shape or dtype None means any. A missing, unexpected (unless ``allow_extra``), mis-shaped or
    mis-typed tensor is a FileFormatError naming the file and the key.
    """
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise FileFormatError(f"{path}: missing tensors {missing[:5]}")
    extra = sorted(set(tensors) - set(expected))
    if extra and not allow_extra:
        raise FileFormatError(f"{path}: unexpected tensors {extra[:5]}")
    for name, (shape, dtype) in expected.items():
        a = tensors[name]
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise FileFormatError(f"{path}: tensor {name!r} has shape {tuple(a.shape)}, expected "
                                  f"{tuple(shape)}")
        if dtype is not None and a.dtype != np.dtype(dtype):
            raise FileFormatError(f"{path}: tensor {name!r} has dtype {a.dtype}, expected "
                                  f"{np.dtype(dtype)}")

"""Tensor files: safetensors written with ``safetensors.numpy`` and read back only after the header
has been checked field by field, plus ``.npz`` read with ``allow_pickle=False``.

Every file [`save_tensors`][] writes carries a SHA-256 of its tensors and metadata in the
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
from dataclasses import dataclass
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
_DTYPES["BF16"] = "<u2"  # numpy has no bfloat16: its 16 bits, read by read_tensors


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
    ``minilora.sha256`` so that [`load_tensors`][] can find any damage.
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
    n = _header_length(path, raw[:8], len(raw))
    header, metadata = _check_header(path, raw[8:8 + n], len(raw) - 8 - n)
    return header, metadata, 8 + n


def _header_length(path: Path, first8: bytes, file_size: int) -> int:
    if file_size < 8 or len(first8) < 8:
        raise FileFormatError(f"{path}: truncated: {file_size} bytes, a safetensors file has at "
                              f"least 8")
    (n,) = struct.unpack("<Q", first8)
    if n > MAX_HEADER_BYTES or n > file_size - 8:
        raise FileFormatError(f"{path}: header length {n} exceeds the file's {file_size - 8} "
                              f"remaining bytes (truncated or damaged)")
    return n


def _check_header(path: Path, text: bytes, data_len: int) -> tuple[dict, dict[str, str]]:
    """The header's tensor entries and metadata, every entry checked against ``data_len``, the
    number of bytes after the header: tensors must tile the data exactly."""
    try:
        header = strict_loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FileFormatError(f"{path}: damaged header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{path}: damaged header: expected a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FileFormatError(f"{path}: damaged header: __metadata__ must map str to str")
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
    return header, metadata


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
    """The string metadata saved by [`save_tensors`][] (the checksum entry left out)."""
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


# ---- foreign safetensors files, read tensor by tensor ------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it: ``dtype`` is the file's name for it
    (``"F32"``, ``"BF16"``, ...), ``begin``/``end`` its bytes counted from the end of the header."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors (name -> TensorInfo) and metadata of a safetensors file, checked as completely
    as [`load_tensors`][] checks them, without reading any tensor: what a reader compares with
    what it expects before it allocates anything."""
    path = Path(path)
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        n = _header_length(path, _read(f, path, 8), size)
        text = _read(f, path, n)
    if len(text) != n:
        raise FileFormatError(f"{path}: truncated while reading its header")
    header, metadata = _check_header(path, text, size - 8 - n)
    infos = {name: TensorInfo(e["dtype"], tuple(e["shape"]), *e["data_offsets"])
             for name, e in header.items()}
    return infos, metadata


def read_tensors(path: str | os.PathLike, infos: Mapping[str, TensorInfo],
                 dtype=None) -> dict[str, np.ndarray]:
    """name -> array for each of ``infos`` (from [`read_header`][] of the same file), one tensor
    read at a time. bfloat16 is widened exactly to float32 (its bits are the top half of a
    float32's); ``dtype`` converts every tensor after that (None keeps the stored dtype)."""
    path = Path(path)
    out = {}
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        start = 8 + _header_length(path, _read(f, path, 8), size)
        for name, info in infos.items():
            raw = _read(f, path, info.end - info.begin, start + info.begin)
            if len(raw) != info.end - info.begin:
                raise FileFormatError(f"{path}: truncated while reading tensor {name!r}")
            a = np.frombuffer(raw, dtype=_DTYPES[info.dtype]).reshape(info.shape)
            if info.dtype == "BF16":
                a = (a.astype(np.uint32) << 16).view(np.float32)
            out[name] = a.astype(a.dtype.newbyteorder("=") if dtype is None else dtype)
    return out


def _read(f, path: Path, n: int, at: int | None = None) -> bytes:
    try:
        if at is not None:
            f.seek(at)
        return f.read(n)
    except OSError as e:
        raise FileFormatError(f"{path}: cannot read safetensors file: {e.strerror}") from None


def _open(path: Path):
    if not path.is_file():
        read_bytes(path, "safetensors")  # raises the right error for missing / directory
    try:
        return open(path, "rb")  # the caller closes it (with)
    except OSError as e:
        raise FileFormatError(f"{path}: cannot read safetensors file: {e.strerror}") from None

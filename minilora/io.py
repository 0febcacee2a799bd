"""Safe files: atomic writes, checked safetensors and JSON, and one writer per run directory.

No pickle anywhere. Tensors go to safetensors (written with ``safetensors.numpy``) and are read back
only after the header has been checked field by field; ``.npz`` files are read with
``allow_pickle=False``. Every file minilora writes carries a SHA-256 of its contents in the
safetensors metadata (``minilora.sha256``), so a bit flipped anywhere, in the header or the data, is
found. Whatever is wrong with a file, reading it raises :class:`FileFormatError` naming the file
and the fault, never another exception, and nothing is half-written: writes go to a temporary file
in the same directory, are fsynced, and renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors.numpy

from minilora.errors import ConfigError, FileFormatError, RunLockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

CHECKSUM_KEY = "minilora.sha256"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_JSON_BYTES = 64 * 1024 * 1024
_TEMP_SUFFIX = ".tmp"

# safetensors dtype names <-> numpy dtypes (little-endian), the ones numpy can hold
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
_NATIVE = {np.dtype(v).newbyteorder("=") for v in _DTYPES.values()}


# ---- atomic writes -------------------------------------------------------------------------
def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a directory entry (a rename) to disk; a no-op where the OS cannot."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None):
    """Write ``path`` all at once: yields a file open on a temporary file in the same directory.

    On a clean exit the file is fsynced, renamed over ``path`` (``os.replace``) and the directory
    fsynced; on an exception the temporary file is removed and ``path`` is left as it was. A crash
    at any moment leaves either the old file or the new one, plus at worst a stray
    ``.NAME.*.tmp`` (see :func:`remove_temp_files`).
    """
    if mode not in ("wb", "w"):
        raise ConfigError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=directory)
    except OSError as e:
        raise FileFormatError(f"{path}: cannot create a file in {directory}: {e.strerror}") \
            from None
    try:
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        mode_bits = path.stat().st_mode & 0o777 if path.is_file() else 0o644
        os.chmod(tmp, mode_bits)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def write_atomic_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_atomic_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically."""
    write_atomic_bytes(path, text.encode("utf-8"))


def remove_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files that a killed writer left in ``directory``.

    Only safe while holding the directory's :class:`RunLock`. Returns the paths removed.
    """
    removed = []
    for p in Path(directory).glob(f".*{_TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def _read_bytes(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file, or a FileFormatError saying why not."""
    path = Path(path)
    try:
        if not path.exists():
            raise FileFormatError(f"{path}: {what} file does not exist")
        if not path.is_file():
            raise FileFormatError(f"{path}: expected a {what} file, found a directory or device")
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise FileFormatError(f"{path}: {what} file is {path.stat().st_size} bytes, more than "
                                  f"the {max_bytes} allowed")
        return path.read_bytes()
    except OSError as e:
        raise FileFormatError(f"{path}: cannot read {what} file: {e.strerror}") from None


# ---- tensors: safetensors and npz -----------------------------------------------------------
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
        header = json.loads(raw[8:8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates,
                            parse_constant=_no_constants)
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


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


def _load_safetensors(path: Path, require_checksum: bool) -> tuple[dict, dict[str, str]]:
    raw = _read_bytes(path, "safetensors")
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
        _read_bytes(path, "npz")  # raises the right error for missing / directory
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


# ---- JSON ------------------------------------------------------------------------------------
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
    ``schema`` (see :func:`check_schema`). Anything wrong is a FileFormatError naming the file."""
    raw = _read_bytes(path, "JSON", MAX_JSON_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path}: not UTF-8 at byte {e.start}") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
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
    whole or absent (at worst a torn last line, which :func:`read_jsonl` drops)."""
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
    raw = _read_bytes(path, "JSON-lines")
    lines = raw.split(b"\n")
    lines = lines[:-1]  # after the last newline: empty, or a torn line
    out = []
    for i, line in enumerate(lines, 1):
        try:
            out.append(json.loads(line.decode("utf-8"), parse_constant=_no_constants))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise FileFormatError(f"{path}: line {i} is not valid JSON ({e})") from None
    return out


# ---- one writer per run directory ---------------------------------------------------------
class RunLock:
    """An exclusive lock on a run directory, held by one process: ``with RunLock(dir): ...``.

    The lock file (``DIR/run.lock``) holds the owner's PID. The lock itself is an ``flock`` on
    that file, which the kernel drops when the process dies, so a lock left by a killed run is taken
    over at once (no stale lock can get stuck); a live owner is refused with a RunLockedError
    naming its PID. POSIX only.
    """

    def __init__(self, directory: str | os.PathLike, name: str = "run.lock"):
        self.directory = Path(directory)
        self.path = self.directory / name
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            raise RunLockedError(f"{self.path}: this RunLock is already held")
        if not self.directory.is_dir():
            raise FileFormatError(f"{self.directory}: run directory does not exist")
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._lock(fd):
                    raise RunLockedError(f"{self.directory} is in use by process "
                                         f"{_read_pid(fd)} (lock file {self.path}); wait for "
                                         f"that run to end or stop it")
                if _same_file(fd, self.path):  # not unlinked by a releasing owner meanwhile
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                    os.fsync(fd)
                    self._fd, fd = fd, None
            finally:
                if fd is not None:
                    os.close(fd)
        return self

    @staticmethod
    def _lock(fd: int) -> bool:
        if fcntl is None:  # pragma: no cover - not POSIX
            raise ConfigError("RunLock needs a POSIX system (fcntl.flock)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                return False
            raise

    def release(self) -> None:
        """Remove the lock file and let go (a no-op if not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

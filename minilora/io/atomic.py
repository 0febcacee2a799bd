"""Atomic writes: a temporary file in the same directory, fsynced, then renamed into place.

A crash at any moment leaves the old file or the new one, never a mix; at worst a stray
``.NAME.*.tmp`` that [`remove_temp_files`][] deletes. Also the one place files are read for the
other readers, so every way a path can fail to be a readable file gives a FileFormatError.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from minilora.errors import ConfigError, FileFormatError

_TEMP_SUFFIX = ".tmp"


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
    ``.NAME.*.tmp`` (see [`remove_temp_files`][]).
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
    """Replace ``path`` by ``data`` atomically (see [`atomic_write`][])."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_atomic_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically."""
    write_atomic_bytes(path, text.encode("utf-8"))


def remove_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files that a killed writer left in ``directory``.

    Only safe while holding the directory's [`RunLock`][]. Returns the paths removed.
    """
    removed = []
    for p in Path(directory).glob(f".*{_TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def read_bytes(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> bytes:
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

"""One writer per run directory: an flock-ed lock file holding the owner's PID."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from minilora.errors import ConfigError, FileFormatError, RunLockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None


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
                    raise self._in_use(fd)
                if _same_file(fd, self.path):  # not unlinked by a releasing owner meanwhile
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                    os.fsync(fd)
                    self._fd, fd = fd, None
            finally:
                if fd is not None:
                    os.close(fd)
        return self

    def check_free(self) -> None:
        """A RunLockedError if a live process holds the lock; changes nothing (a probe, so that
        a second run is refused before it does any work)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file (or none we can open): nobody to refuse for
        try:
            if not self._lock(fd):
                raise self._in_use(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _in_use(self, fd: int) -> RunLockedError:
        pid = _read_pid(fd)
        who = f"process {pid}" if pid is not None else "another process"
        return RunLockedError(f"{self.directory} is in use by {who} (lock file {self.path}); "
                              "wait for that run to end or stop it")

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

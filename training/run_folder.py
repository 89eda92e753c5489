"""A run folder owned by one process at a time, atomic writes, and no trace of a refused run.

``claim(path)`` creates the folder if needed and takes an exclusive lock on it (``flock`` on
``path/.lock``, released by the kernel even when the process is killed), so a second run on the
same folder is refused with one line. If the block raises before ``started()`` is called (the run
was refused: bad data, an incompatible checkpoint, ...), the folders the claim created are
removed again. Files are written whole: ``write_text_atomic`` writes a temporary file in the same
folder, fsyncs it and renames it over the target.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, List

LOCK_NAME = ".lock"
TEMP_SUFFIX = ".tmp"


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


class RunExists(ValueError):
    """The folder already holds what this command would write; nothing was changed."""


class _Claim:
    def __init__(self, path: Path, created: List[Path], fd: int):
        self.path, self._created, self._fd, self._started = path, created, fd, False

    def started(self) -> None:
        """The run is known to start: from now on its folder stays, whatever happens."""
        self._started = True

    def _release(self, refused: bool) -> None:
        lock = self.path / LOCK_NAME
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it: see _lock for the race this leaves closed
        os.close(self._fd)
        if refused and not self._started:
            for folder in reversed(self._created):  # only what the claim made, and only if empty
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _lock(path: Path) -> int:
    lock = path / LOCK_NAME
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderBusy(f"run folder {path} is in use by another run{holder}; wait for it to end or "
                                    "choose another --out") from None
            raise
        # The holder before us may have unlinked the file between our open and our flock: then we
        # locked a file nobody else can see. Lock the one at the path.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def claim(path) -> Iterator[_Claim]:
    """Create ``path`` if needed and hold its lock for the block (see the module docstring)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunExists(f"{path} exists and is not a folder; a run needs a folder there (choose another --out)")
    created = []
    probe = path
    while not probe.exists():
        created.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    created.reverse()  # outermost first
    path.mkdir(parents=True, exist_ok=True)
    try:
        fd = _lock(path)
    except BaseException:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    handle = _Claim(path, created, fd)
    try:
        yield handle
    except BaseException:
        handle._release(refused=True)
        raise
    handle._release(refused=False)


def remove_stale_temporaries(folder) -> List[Path]:
    """Delete the temporary files a killed writer left in ``folder`` (call it holding the lock)."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for item in folder.iterdir():
            if item.is_file() and item.name.endswith(TEMP_SUFFIX):
                item.unlink()
                removed.append(item)
    return removed


def write_bytes_atomic(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all (temporary file, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path, value) -> Path:
    return write_text_atomic(path, json.dumps(value, indent=1, default=str))


def refuse_existing(paths, what: str, hint: str = "pass --overwrite to replace it") -> None:
    """Raise ``RunExists`` naming the first of ``paths`` that exists."""
    for path in paths:
        if Path(path).exists():
            raise RunExists(f"{path} already exists ({what}); nothing was changed; {hint}")

"""Small file-system helpers shared by every module that writes: atomic writes and hashing.

A write is atomic: a temporary name in the same folder (see ``temporaries``), flush, fsync,
``os.replace``, fsync of the folder. A crash leaves either the old file or the new one, never a
mix; leftovers are removed by ``Run.recover``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Callable, Iterator

from aptbundle.ground.temporaries import temp_path

BLOCK = 1 << 20  # 1 MiB reads: large enough for full hashing speed, small enough for flat memory

Progress = Callable[[int], None]


def announce_total(progress: Progress | None, total: int) -> None:
    """Tell a progress callback how many bytes to expect, if it wants to know (``set_total``)."""
    if progress is not None and hasattr(progress, "set_total"):
        progress.set_total(total)


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside ``path`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: int = 0o644) -> Iterator:
    """Open a temporary file beside ``path`` for binary writing; rename it into place on success.

    For example::

        with atomic_open("run/config.json") as f: f.write(b"{}")
    """
    path = Path(path)
    tmp = temp_path(path.parent, path.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(data)


def hash_file(path: str | Path, progress: Progress | None = None) -> tuple[int, str]:
    """Return ``(size, sha256 hex)`` of a file, read once in 1 MiB blocks."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
            if progress:
                progress(n)
    return size, h.hexdigest()


def fsync_file(path: Path) -> None:
    """fsync one file already written and closed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpecialFile(OSError):
    """A FIFO, device, socket or folder where a regular file was expected."""


def file_kind(mode: int) -> str:
    """What a non-regular file is, for a message."""
    return ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a symbolic link"
            if stat.S_ISLNK(mode) else "a device or socket")


def read_capped(path: str | Path, limit: int, *, follow_links: bool = True) -> bytes:
    """At most ``limit + 1`` bytes of the regular file ``path`` (the caller refuses more than
    ``limit``). Opened without blocking, so a FIFO or device is ``SpecialFile`` at once, never a
    wait; ``follow_links=False`` refuses a link too (``SpecialFile``)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        st = os.stat(path, follow_symlinks=follow_links)  # looked at first: a device is never opened
    except FileNotFoundError:
        raise
    if not stat.S_ISREG(st.st_mode):
        raise SpecialFile(f"{path}: is {file_kind(st.st_mode)}, not a regular file")
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SpecialFile(f"{path}: is a symbolic link, not a regular file") from None
        raise
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SpecialFile(f"{path}: is not a regular file")
        return f.read(limit + 1)

"""The run's locks: one writer at a time, and commits that readers never see half done.

Two advisory locks (``portalocker``: ``flock`` on POSIX, ``LockFileEx`` on Windows), both
dropped by the operating system when their holder dies, so a killed trainer never leaves a run
locked:

- the **writer lock** (``.aptrun.lock``) is held exclusively for a whole training session or
  adoption. A second writer is refused at once, with the holder's process id.
- the **commit lock** is held exclusively while a writer commits (renames a checkpoint in,
  rewrites the manifest, deletes retired files) and shared while a reader (``pack``,
  ``verify``, ``resume``) looks at the run. A reader waits for a commit in progress instead of
  seeing its middle, and a writer waits for readers to finish. It is taken on the run folder
  itself, so it leaves no file behind (where folders cannot be locked, Windows, on a
  ``.aptrun.commit.lock`` file, which is never packed).

Both are reentrant: the writer lock per process (``aptbundle resume`` verifies under it, then
the trainer it starts takes it again), the commit lock per thread (a background save commits
from its own thread and must exclude the others).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from pathlib import Path
from typing import Iterator

from aptbundle.ground.errors import RunLockedError

WRITER_LOCK = ".aptrun.lock"
COMMIT_LOCK = ".aptrun.commit.lock"
LOCK_NAMES = (WRITER_LOCK, COMMIT_LOCK)
WAIT_S = 600.0  # how long a reader waits for a commit, or a commit for readers, before giving up

_writers: dict[str, list] = {}  # run folder -> [file, count], this process's writer locks
_writers_guard = threading.Lock()
_local = threading.local()  # .held: run folder -> [file, mode, count], this thread's commit locks


def is_lock_name(name: str) -> bool:
    """True for the lock files, which are never listed, packed or verified."""
    return name in LOCK_NAMES


def _key(run_dir: Path) -> str:
    return os.path.realpath(run_dir)


def _portalocker():
    import portalocker  # imported on first use: it costs 40 ms, and archive commands take no lock

    return portalocker


def _try(f, exclusive: bool) -> bool:
    pl = _portalocker()
    try:
        pl.lock(f, (pl.LOCK_EX if exclusive else pl.LOCK_SH) | pl.LOCK_NB)
        return True
    except (pl.exceptions.LockException, BlockingIOError):
        return False


@contextlib.contextmanager
def writer(run_dir: str | Path) -> Iterator[None]:
    """Hold the run's writer lock; ``RunLockedError`` at once if another process holds it.

    The lock file holds the holder's process id and is removed on release (while still held,
    so no folder is left with a stray lock file).
    """
    run_dir = Path(run_dir)
    key = _key(run_dir)
    with _writers_guard:
        if key in _writers:
            _writers[key][1] += 1
            held = True
        else:
            held = False
    if held:
        try:
            yield
        finally:
            with _writers_guard:
                _writers[key][1] -= 1
        return
    path = run_dir / WRITER_LOCK
    while True:
        f = open(path, "a+b")
        if not _try(f, True):
            try:  # Windows forbids reading a locked range: then the holder stays unnamed
                f.seek(0)
                holder = f.read(64).decode("ascii", "replace").strip() or "another process"
            except OSError:
                holder = "another process"
            f.close()
            raise RunLockedError(f"{run_dir}: is being written by process {holder}; wait for it to finish"
                                 " or stop it, then try again")
        try:  # the holder before us may have removed the file: then lock the new one
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    try:
        f.truncate(0)
        f.write(str(os.getpid()).encode())
        f.flush()
        with _writers_guard:
            _writers[key] = [f, 1]
        yield
    finally:
        with _writers_guard:
            _writers.pop(key, None)
        with contextlib.suppress(OSError):
            os.unlink(path)
        f.close()


class _FolderHandle:
    """An open run folder, to be locked like a file."""

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)


def _open_commit_lock(run_dir: Path, for_write: bool):
    if os.name != "nt":
        return _FolderHandle(os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)))
    path = run_dir / COMMIT_LOCK
    try:
        return open(path, "a+b")
    except OSError as e:
        if for_write or e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
    try:  # a read-only run: lock the existing file, or none (nobody can commit to it)
        return open(path, "rb")
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _commit_lock(run_dir: str | Path, exclusive: bool, wait_s: float) -> Iterator[None]:
    run_dir = Path(run_dir)
    key = _key(run_dir)
    held = getattr(_local, "held", None)
    if held is None:
        held = _local.held = {}
    if key in held:
        if exclusive and not held[key][1]:
            raise RuntimeError(f"{run_dir}: cannot commit while this thread reads the run")
        held[key][2] += 1
        try:
            yield
        finally:
            held[key][2] -= 1
        return
    f = _open_commit_lock(run_dir, exclusive)
    if f is None:
        yield
        return
    deadline = time.monotonic() + wait_s
    delay = 0.005
    try:
        while not _try(f, exclusive):
            if time.monotonic() > deadline:
                what = "a reader to finish" if exclusive else "a commit to finish"
                raise RunLockedError(f"{run_dir}: waited {wait_s:.0f} s for {what}; the run is busy,"
                                     " try again later")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        held[key] = [f, exclusive, 1]
        try:
            yield
        finally:
            del held[key]
    finally:
        f.close()  # closing drops the lock


def reading(run_dir: str | Path, wait_s: float = WAIT_S) -> contextlib.AbstractContextManager:
    """Hold the commit lock shared: no commit changes the run until the block ends."""
    return _commit_lock(run_dir, False, wait_s)


def committing(run_dir: str | Path, wait_s: float = WAIT_S) -> contextlib.AbstractContextManager:
    """Hold the commit lock exclusively: readers wait until the commit is complete."""
    return _commit_lock(run_dir, True, wait_s)

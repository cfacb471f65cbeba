"""Where a store keeps its objects: one small interface, for a local folder and for fsspec URLs.

A store is a flat space of keys (``layout``). ``Backend`` is what push, pull, ls and gc need of
it: ``stat``, ``open``, ``list``, ``put_bytes``, ``swap`` and ``delete``; ``Store`` adds what
every caller shares (size-capped reads, the count of bytes sent, names for messages). Every
write is all or nothing: locally a temporary file in the key's folder, flushed to disk and
renamed into place; on an object store one put (a large one a multipart upload that becomes
visible only when it completes; gc aborts what a killed one left).

Containment is by construction. A key is split by ``layout.parts``, which refuses anything but
plain components under one of the store's four folders. The local backend then walks to it one
folder at a time through directory descriptors opened with ``O_NOFOLLOW``: a symbolic link
anywhere inside the store (a linked ``blobs/``, a linked ``sha256/ab``, a linked object) is an
error, never followed, so nothing outside the store root is read, written or deleted. Only
regular files are opened, and without blocking: a FIFO, a device or a folder where an object
should be is an error at once, never a wait.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol

from aptbundle.ground import temporaries
from aptbundle.ground.errors import StoreError, StoreLayoutError
from aptbundle.store.layout import BLOBS, FORMAT, FORMAT_TEXT, LOCKS, REFS, TOPS, Entry, parts
from aptbundle.transfer.remote import is_remote

_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


class Backend(Protocol):
    """What a store needs of the place it lives in."""

    url: str

    def stat(self, key: str) -> Entry | None:
        """The object at ``key`` (None if there is none); an error if something else is there."""

    def open(self, key: str, ahead: bool = False) -> BinaryIO:
        """The object for streaming reads; ``FileNotFoundError`` if there is none."""

    def list(self, prefix: str) -> list[Entry]:
        """Every object below the folder ``prefix``, sorted by key."""

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write the object at ``key`` whole: it appears complete or not at all, never partly."""

    def delete(self, key: str) -> None:
        """Remove the object at ``key`` if it is there."""

    def swap(self, key: str, old: bytes | None, new: bytes) -> bool:
        """Write ``new`` at ``key`` only if it holds ``old`` (None: nothing); whether it did."""

    def clean_temporaries(self, prefix: str, older_than: float) -> int:
        """Remove what killed writers left below ``prefix``; how many went."""


def _kind(mode: int) -> str:
    return ("a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode)
            else "a file" if stat.S_ISREG(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket")


class LocalBackend:
    """A store in a local folder. The root itself may be reached through links (the user chose
    it); below it, nothing is followed."""

    def __init__(self, root: str):
        self.url = self.root = root

    def _crafted(self, key: str, what: str) -> StoreError:
        return StoreLayoutError(f"{self.url}/{key}: is {what}, where the store keeps its objects; aptbundle follows no"
                          " link and opens only regular files inside a store. The store is damaged or crafted:"
                          " remove it, or use another store")

    def check(self) -> None:
        """Refuse a store whose top folders are links or files, or whose refs or locks are not all
        regular files: every command sees them (a small listing), so none of them goes on."""
        for top in TOPS:
            try:
                st = os.lstat(os.path.join(self.root, top))
            except (FileNotFoundError, NotADirectoryError):
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise self._crafted(top, _kind(st.st_mode))
        self.list(REFS)
        self.list(LOCKS)

    @contextlib.contextmanager
    def _folder(self, comps: list[str], create: bool = False) -> Iterator[int]:
        """A descriptor of the folder ``root/comps...``, reached without following any link
        (``create``: the folders are made where missing, the store's root too)."""
        if create:
            os.makedirs(self.root, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            for i, c in enumerate(comps):
                try:
                    nfd = os.open(c, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(c, 0o755, dir_fd=fd)
                    nfd = os.open(c, _DIR, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                        raise self._crafted("/".join(comps[:i + 1]),
                                            _kind(os.stat(c, dir_fd=fd, follow_symlinks=False).st_mode)) from None
                    raise
                os.close(fd)
                fd = nfd
            yield fd
        finally:
            os.close(fd)

    def stat(self, key: str) -> Entry | None:
        comps = parts(key)
        try:
            with self._folder(comps[:-1]) as fd:
                st = os.stat(comps[-1], dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            raise self._crafted(key, _kind(st.st_mode))
        return Entry(key, st.st_mtime, st.st_size)

    def open(self, key: str, ahead: bool = False) -> BinaryIO:
        comps = parts(key)
        with self._folder(comps[:-1]) as fd:
            st = os.stat(comps[-1], dir_fd=fd, follow_symlinks=False)  # FileNotFoundError: no such object
            if not stat.S_ISREG(st.st_mode):  # looked at before opening: a device is never opened
                raise self._crafted(key, _kind(st.st_mode))
            try:
                f = os.open(comps[-1], _READ, dir_fd=fd)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise self._crafted(key, "a symbolic link") from None
                raise
        if not stat.S_ISREG(os.fstat(f).st_mode):  # swapped in meanwhile
            os.close(f)
            raise self._crafted(key, "not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(f, True)
        return open(f, "rb")

    def list(self, prefix: str) -> list[Entry]:
        comps = parts(prefix)
        out: list[Entry] = []
        try:
            with self._folder(comps) as fd:
                self._walk(fd, prefix, out)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(out, key=lambda e: e.key)

    def _walk(self, fd: int, at: str, out: list[Entry]) -> None:
        with os.scandir(fd) as it:
            entries = list(it)
        for e in entries:
            key = f"{at}/{e.name}"
            st = e.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                out.append(Entry(key, st.st_mtime, st.st_size))
            elif stat.S_ISDIR(st.st_mode):
                try:
                    sub = os.open(e.name, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    continue
                except OSError:
                    raise self._crafted(key, "a symbolic link") from None
                try:
                    self._walk(sub, key, out)
                finally:
                    os.close(sub)
            else:
                raise self._crafted(key, _kind(st.st_mode))

    @contextlib.contextmanager
    def _writer(self, key: str) -> Iterator[BinaryIO]:
        comps = parts(key)
        with self._folder(comps[:-1], create=True) as fd:
            tmp = temporaries.temp_name(comps[-1])
            f = open(os.open(tmp, _WRITE, 0o644, dir_fd=fd), "wb")
            try:
                with f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.replace(tmp, comps[-1], src_dir_fd=fd, dst_dir_fd=fd)  # replaces a link, never follows it
                except IsADirectoryError:
                    raise self._crafted(key, "a folder") from None
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=fd)
                raise

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._writer(key) as f:
            f.write(data)

    def swap(self, key: str, old: bytes | None, new: bytes) -> bool:
        """Write ``new`` at ``key`` if it still holds ``old`` (None: nothing); whether it did. The
        folder is locked meanwhile, so writers of the same key take turns."""
        import fcntl

        comps = parts(key)
        with self._folder(comps[:-1], create=True) as fd:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                found = self.stat(key)
                current = None
                if found is not None:
                    with self.open(key) as f:
                        current = f.read()
                if current != old:
                    return False
                self.put_bytes(key, new)
                return True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def delete(self, key: str) -> None:
        comps = parts(key)
        try:
            with self._folder(comps[:-1]) as fd:
                st = os.stat(comps[-1], dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    raise self._crafted(key, "a folder")
                os.unlink(comps[-1], dir_fd=fd)  # a link itself goes, never what it points to
        except (FileNotFoundError, NotADirectoryError):
            pass

    def clean_temporaries(self, prefix: str, older_than: float) -> int:
        gone = 0
        for e in self.list(prefix):
            name = e.key.rsplit("/", 1)[-1]
            if temporaries.is_temp_name(name) and (temporaries.is_stale(name) or time.time() - e.mtime > older_than):
                self.delete(e.key)
                gone += 1
        return gone


class Store:
    """One store, local or remote: its backend, and what every caller of it shares."""

    def __init__(self, url: str | Path):
        self.url = str(url).rstrip("/") or "/"
        self.sent = 0  # bytes written through ``writer`` and ``put``: what push reports
        self.warnings: list[str] = []  # what a command should tell its user (a lock from the future...)
        self._version: int | None = None
        self._sent_lock = threading.Lock()  # objects are written from several threads
        if is_remote(self.url):
            from aptbundle.store.remote import RemoteBackend  # only remote stores pay for fsspec

            self.backend: Backend = RemoteBackend(self.url)
        else:
            if Path(self.url).exists() and not Path(self.url).is_dir():
                raise StoreError(f"{self.url}: is not a folder; a store is a folder or a URL")
            self.backend = LocalBackend(self.url)
            if Path(self.url).is_dir():
                self.backend.check()

    def count(self, n: int) -> None:
        with self._sent_lock:
            self.sent += n

    @classmethod
    def existing(cls, url: str | Path) -> "Store":
        """A store that must already be there (what pull, ls and gc read)."""
        store = cls(url)
        if isinstance(store.backend, LocalBackend) and not Path(store.url).is_dir():
            raise StoreError(f"{store.url}: no such store (folder); check the path, or push a run there first")
        return store

    @property
    def remote(self) -> bool:
        """An object store reached over a network (whose reads may be damaged on the way)."""
        return not isinstance(self.backend, LocalBackend)

    def where(self, key: str) -> str:
        """The key as a person reads it in a message: the store's URL and the key."""
        return f"{self.url}/{key}"

    def exists(self, key: str) -> bool:
        return self.backend.stat(key) is not None

    def open(self, key: str, ahead: bool = False) -> BinaryIO:
        return self.backend.open(key, ahead)

    def read(self, key: str, limit: int) -> bytes | None:
        """The whole object (None if there is none); refuses one larger than ``limit`` (locally
        before reading it; remotely after ``limit + 1`` bytes of one ranged GET)."""
        read_all = getattr(self.backend, "read_all", None)
        if read_all is not None:  # a remote store: one ranged GET, tried again on a failure
            try:
                data = read_all(key, limit)
            except FileNotFoundError:
                return None
            except IsADirectoryError:
                raise StoreLayoutError(f"{self.where(key)}: is a folder, not an object; the store is damaged or"
                                       " crafted") from None
            size = len(data)
        else:
            found = self.backend.stat(key)
            if found is None:
                return None
            size, data = found.size, b""
            if size <= limit:
                try:
                    with self.open(key) as f:
                        data = f.read(limit + 1)
                except FileNotFoundError:
                    return None
        if size > limit or len(data) > limit:
            raise StoreError(f"{self.where(key)}: over {limit} bytes, more than such an object may be;"
                             " the store is damaged or crafted")
        return data

    def list(self, prefix: str) -> list[Entry]:
        return self.backend.list(prefix)

    def put(self, key: str, data: bytes, *, count: bool = True) -> None:
        """Write an object whole (``count=False``: bookkeeping, not counted in ``sent``)."""
        self.backend.put_bytes(key, data)
        self.count(len(data) if count else 0)

    def delete(self, key: str) -> None:
        self.backend.delete(key)

    def swap(self, key: str, old: bytes | None, new: bytes) -> bool:
        """Compare-and-swap a small object: write ``new`` only if ``key`` still holds ``old``."""
        done = self.backend.swap(key, old, new)
        self.count(len(new) if done else 0)
        return done

    @property
    def version(self) -> int | None:
        """The store's format version: 2 (its ``format`` says so), 1 (runs but no ``format``: an
        older aptbundle's store), or None (an empty store, which a push makes version 2)."""
        if self._version is None:
            raw = self.read(FORMAT, 64)
            if raw is not None:
                if raw != FORMAT_TEXT:
                    raise StoreError(f"{self.where(FORMAT)}: says {raw[:40]!r}, a store format this aptbundle does"
                                     " not know (it reads versions 1 and 2); upgrade aptbundle")
                self._version = 2
            elif self.list(REFS) or self.list(BLOBS):
                self._version = 1
        return self._version

    def mark_version(self, write: bool = True) -> None:
        """Make this a version-2 store: its ``format`` written (``write=False``: taken as one in
        this process only, while an upgrade writes it)."""
        if write and self.version is None:
            self.put(FORMAT, FORMAT_TEXT)
        self._version = 2

    def require(self, version: int, verb: str) -> None:
        """Refuse to ``verb`` a store of another format version."""
        if self.version not in (version, None):
            raise StoreError(f"{self.url}: is a version-{self.version} store, which this aptbundle only reads"
                             f" (pull, ls); to {verb} it, convert it first: aptbundle store upgrade {self.url}")

    def clean_stale_temporaries(self, prefix: str, older_than: float) -> int:
        """Remove temporaries a killed local writer left below ``prefix``; how many went."""
        return self.backend.clean_temporaries(prefix, older_than)

    def abort_stale_uploads(self, older_than: float) -> int:
        """Abort what killed remote uploads left in the store (gc's work); how many."""
        abort = getattr(self.backend, "abort_uploads", None)
        return abort(older_than) if abort is not None else 0

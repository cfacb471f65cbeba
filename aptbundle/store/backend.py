"""Where a store keeps its objects: a local folder or any fsspec URL (``s3://bucket/store``).

A store is a flat space of keys (``blobs/sha256/ab/abcd…``, ``manifests/…``, ``refs/NAME``,
``locks/…``). Every write is all or nothing: locally a temporary file in the key's folder,
flushed to disk and renamed into place; on an object store one put, or a multipart upload that
becomes visible only when it completes (and is aborted on failure). ``sent`` counts the bytes
written, which is what push reports and what the tests measure.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import queue
import threading
import time
from pathlib import Path
from typing import BinaryIO, Iterator

from aptbundle.archive.storage import is_remote, remote_fs
from aptbundle.ground import temporaries
from aptbundle.ground.ahead import ReadAhead
from aptbundle.ground.errors import StoreError
from aptbundle.ground.fsutil import atomic_open


class _Counting:
    """A writable file that counts what goes through it."""

    def __init__(self, f, store: "Store"):
        self.f, self.store = f, store

    def write(self, b) -> int:
        n = self.f.write(b)
        self.store.sent += len(b)
        return n

    def flush(self) -> None:
        self.f.flush()


class Prefetch(ReadAhead):
    """A reader that fetches ``raw`` ahead in a thread of its own, so the network works while
    the caller decompresses, hashes and writes (remote objects only: local reads are fast)."""

    def __init__(self, raw: BinaryIO, chunk: int = 32 << 20, depth: int = 2):
        # large ranges: an object store answers each read with one ranged GET, and a request
        # costs (on a loopback moto server, 8 MiB ranges are 3x slower than 32 MiB ones)
        self.raw = raw
        super().__init__(lambda: raw.read(chunk), depth, "prefetch")

    def close(self) -> None:
        super().close()
        self.raw.close()


class _WriteBehind:
    """A writer that uploads in a thread of its own while the caller compresses the next part."""

    def __init__(self, f, depth: int = 2):
        self.f = f
        self._q: queue.Queue = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="upload", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (b := self._q.get()) is not None:
            if self._error is None:
                try:
                    self.f.write(b)
                except BaseException as e:
                    self._error = e

    def write(self, b) -> int:
        if self._error is not None:
            raise self._error
        self._q.put(bytes(b))
        return len(b)

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        """Wait for every write; re-raise an upload error."""
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


class Store:
    """One store, local or remote; keys are POSIX-style relative paths."""

    def __init__(self, url: str | Path):
        self.url = str(url).rstrip("/") or "/"
        self.sent = 0
        if is_remote(self.url):
            self.fs, self.root = remote_fs(self.url)
            self.local = False
        else:
            self.fs, self.root = None, self.url
            self.local = True
            if not Path(self.url).is_dir():
                if Path(self.url).exists():
                    raise StoreError(f"{self.url}: is not a folder; a store is a folder or a URL")

    # -- paths --------------------------------------------------------------------------------
    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root != "/" else f"/{key}"

    def shown(self, key: str) -> str:
        return f"{self.url}/{key}"

    # -- reading --------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        if self.local:
            return os.path.isfile(self._path(key))
        return self.fs.exists(self._path(key))

    def read(self, key: str, limit: int) -> bytes | None:
        """The whole object (None if there is none); refuses one larger than ``limit``."""
        try:
            with self.open(key) as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        if len(data) > limit:
            raise StoreError(f"{self.shown(key)}: over {limit} bytes, more than such an object may be;"
                             " the store is damaged or crafted")
        return data

    def open(self, key: str, ahead: bool = False):
        """The object for streaming reads; ``FileNotFoundError`` if there is none. ``ahead``:
        a remote object is fetched ahead in a thread (``Prefetch``), for large sequential reads."""
        if self.local:
            fd = os.open(self._path(key), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
            return open(fd, "rb")
        f = self.fs.open(self._path(key), "rb", block_size=8 << 20, cache_type="none")
        return Prefetch(f) if ahead else f

    def keys_below(self, prefix: str) -> set[str] | None:
        """Every key below ``prefix`` in one listing (remote stores: one LIST instead of a HEAD per
        object); None for a local store, where asking is cheap."""
        return None if self.local else {key for key, _, _ in self.list(prefix)}

    def list(self, prefix: str) -> list[tuple[str, float, int]]:
        """``(key, modified time, size)`` of every object below the folder ``prefix``."""
        out = []
        if self.local:
            base = Path(self._path(prefix))
            for dirpath, _dirs, files in os.walk(base):
                for name in files:
                    p = Path(dirpath) / name
                    with contextlib.suppress(FileNotFoundError):
                        st = p.lstat()
                        out.append((p.relative_to(self.root).as_posix(), st.st_mtime, st.st_size))
            return sorted(out)
        try:
            found = self.fs.find(self._path(prefix), detail=True)
        except FileNotFoundError:
            return []
        root = self._path("")
        for path, info in found.items():
            path = path if path.startswith("/") or not root.startswith("/") else "/" + path
            key = path[len(root):] if path.startswith(root) else path.split(self.root.strip("/") + "/", 1)[-1]
            out.append((key, _mtime(info), int(info.get("size") or 0)))
        return sorted(out)

    # -- writing --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[_Counting]:
        """A file to write the object into; it appears whole when the block ends, never partly."""
        path = self._path(key)
        if self.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path) as f:
                yield _Counting(f, self)
            return
        f = self.fs.open(path, "wb", block_size=16 << 20)
        behind = _WriteBehind(f)
        try:
            yield _Counting(behind, self)
            behind.finish()
        except BaseException:
            with contextlib.suppress(BaseException):
                behind.finish()
            with contextlib.suppress(Exception):
                f.discard() if hasattr(f, "discard") else None
            raise
        f.close()

    def put(self, key: str, data: bytes, *, count: bool = True) -> None:
        """Write a small object whole (``count=False``: bookkeeping, not counted in ``sent``)."""
        before = self.sent
        with self.writer(key) as f:
            f.write(data)
        if not count:
            self.sent = before

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.local:
                os.unlink(self._path(key))
            else:
                self.fs.rm_file(self._path(key))

    def clean_stale_temporaries(self, prefix: str, older_than: float) -> int:
        """Remove temporaries a killed local writer left below ``prefix``; how many went."""
        if not self.local:
            return 0  # object stores have no temporaries: an upload appears whole or not at all
        gone = 0
        for key, mtime, _ in self.list(prefix):
            name = key.rsplit("/", 1)[-1]
            if temporaries.is_temp_name(name) and (temporaries.is_stale(name) or time.time() - mtime > older_than):
                self.delete(key)
                gone += 1
        return gone


def _mtime(info: dict) -> float:
    """An fsspec listing's modification time as a POSIX timestamp; now when it gives none (so a
    caller that keeps young objects keeps it)."""
    for k in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(k)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, _dt.datetime):
            return v.timestamp()
        if isinstance(v, str):
            with contextlib.suppress(ValueError):
                return _dt.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
    return time.time()

"""A store at an fsspec URL (``s3://bucket/runs``): the ``Backend`` of ``backend`` for object stores.

Object stores have no links, folders or special files, and an upload appears whole or not at
all, so containment is the key's alone (``layout.parts``). Reads of large objects are fetched
ahead in a thread of their own, writes uploaded in one while the next part is compressed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import queue
import threading
import time
from typing import BinaryIO, Iterator

from aptbundle.ground.ahead import ReadAhead
from aptbundle.ground.errors import StoreLayoutError
from aptbundle.store.layout import Entry, parts
from aptbundle.transfer.remote import remote_fs


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


class RemoteBackend:
    """A store at an fsspec URL (``s3://bucket/runs``): object stores have no links, folders or
    special files, and an upload appears whole or not at all."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = remote_fs(url)

    def _path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{'/'.join(parts(key))}"

    def stat(self, key: str) -> Entry | None:
        try:
            info = self.fs.info(self._path(key))
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            raise StoreLayoutError(f"{self.url}/{key}: is a folder, not an object; the store is damaged or crafted")
        return Entry(key, _mtime(info), int(info.get("size") or 0))

    def open(self, key: str, ahead: bool = False) -> BinaryIO:
        try:
            f = self.fs.open(self._path(key), "rb", block_size=8 << 20, cache_type="none")
        except IsADirectoryError:
            raise StoreLayoutError(f"{self.url}/{key}: is a folder, not an object; the store is damaged or crafted") from None
        return Prefetch(f) if ahead else f

    def list(self, prefix: str) -> list[Entry]:
        try:
            found = self.fs.find(self._path(prefix), detail=True)
        except FileNotFoundError:
            return []
        root = self._path(prefix)[:-len(prefix)]
        out = []
        for path, info in found.items():
            path = path if path.startswith("/") or not root.startswith("/") else "/" + path
            key = path[len(root):] if path.startswith(root) else path.split(self.root.strip("/") + "/", 1)[-1]
            out.append(Entry(key, _mtime(info), int(info.get("size") or 0)))
        return sorted(out, key=lambda e: e.key)

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[_WriteBehind]:
        f = self.fs.open(self._path(key), "wb", block_size=16 << 20)
        behind = _WriteBehind(f)
        try:
            yield behind
            behind.finish()
        except BaseException:
            with contextlib.suppress(BaseException):
                behind.finish()
            with contextlib.suppress(Exception):
                getattr(f, "discard", lambda: None)()
            raise
        f.close()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))

    def clean_temporaries(self, prefix: str, older_than: float) -> int:
        return 0  # object stores have no temporaries: an upload appears whole or not at all


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

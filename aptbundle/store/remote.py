"""A store at an fsspec URL (``s3://bucket/runs``): the ``Backend`` of ``backend`` for object stores.

Object stores have no links, folders or special files, and an upload appears whole or not at
all, so containment is the key's alone (``layout.parts``). Reads of large objects are fetched
ahead in a thread of their own; objects are written whole, one put each.
"""

from __future__ import annotations

import contextlib
import os
import datetime as _dt
import time
from typing import Any, BinaryIO, Callable

from aptbundle.ground.ahead import ReadAhead
from aptbundle.ground.errors import AptBundleError, StoreError, StoreLayoutError
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


ATTEMPTS = int(os.environ.get("APTBUNDLE_STORE_ATTEMPTS", "4"))  # one try and three more, 0.25 s, 0.5 s and 1 s
# apart: a brief outage is ridden out (the tests, which fail many calls on purpose, try fewer times)
BACKOFF_S = float(os.environ.get("APTBUNDLE_STORE_BACKOFF", "0.25"))  # the first wait; the tests shorten it


def _transport_error(url: str, key: str, e: BaseException) -> StoreError:
    """The one place a store's transport failure becomes an error a person reads: one line."""
    text = " ".join(str(e).split())[:200] or type(e).__name__
    return StoreError(f"{url}/{key}: the store did not answer as it should ({type(e).__name__}: {text}) after"
                      f" {ATTEMPTS} tries; check the network and the store, then try again")


def retrying(url: str, key: str, call: Callable[[], Any]) -> Any:
    """``call()``, tried again with backoff when the transport fails (``FileNotFoundError`` and
    aptbundle's own errors are answers, not failures); a ``StoreError`` once the tries run out.
    The client libraries below retry nothing themselves (``remote_fs``'s options), so the total is
    bounded here and nowhere else."""
    for attempt in range(ATTEMPTS):
        try:
            return call()
        except (FileNotFoundError, AptBundleError):
            raise
        except Exception as e:  # botocore, aiohttp and fsspec raise far more than OSError
            if attempt == ATTEMPTS - 1:
                raise _transport_error(url, key, e) from None
            time.sleep(BACKOFF_S * 2 ** attempt)
    raise AssertionError("unreachable")


class _Mapped:
    """A remote file whose read errors are the store's (mapped once, where they happen)."""

    def __init__(self, f, url: str, key: str):
        self.f, self.url, self.key = f, url, key

    def read(self, n: int = -1) -> bytes:
        try:
            return self.f.read(n)
        except (FileNotFoundError, AptBundleError):
            raise
        except Exception as e:
            raise _transport_error(self.url, self.key, e) from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteBackend:
    """A store at an fsspec URL (``s3://bucket/runs``): object stores have no links, folders or
    special files, and an upload appears whole or not at all. Every call goes through
    ``retrying``; the client libraries are told not to retry on their own."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = remote_fs(url, **_NO_CLIENT_RETRIES.get(url.split("://", 1)[0], {}))
        if isinstance(getattr(type(self.fs), "retries", None), int):
            self.fs.retries = 1  # s3fs's own loop around botocore's

    def _path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{'/'.join(parts(key))}"

    def _call(self, key: str, call: Callable[[], Any]) -> Any:
        return retrying(self.url, key, call)

    def stat(self, key: str) -> Entry | None:
        try:
            info = self._call(key, lambda: self.fs.info(self._path(key)))
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            raise StoreLayoutError(f"{self.url}/{key}: is a folder, not an object; the store is damaged or crafted")
        return Entry(key, _mtime(info), int(info.get("size") or 0))

    def open(self, key: str, ahead: bool = False) -> BinaryIO:
        try:
            f = self._call(key, lambda: self.fs.open(self._path(key), "rb", block_size=8 << 20, cache_type="none"))
        except IsADirectoryError:
            raise StoreLayoutError(f"{self.url}/{key}: is a folder, not an object; the store is damaged or crafted") from None
        f = _Mapped(f, self.url, key)
        return Prefetch(f) if ahead else f

    def read_all(self, key: str, limit: int) -> bytes:
        """A small object whole (at most ``limit + 1`` bytes), read again if the transport fails."""
        def once() -> bytes:
            with self.fs.open(self._path(key), "rb", block_size=max(limit + 1, 1 << 16), cache_type="none") as f:
                return f.read(limit + 1)

        return self._call(key, once)

    def list(self, prefix: str) -> list[Entry]:
        try:
            found = self._call(prefix, lambda: self.fs.find(self._path(prefix), detail=True))
        except FileNotFoundError:
            return []
        root = self._path(prefix)[:-len(prefix)]
        out = []
        for path, info in found.items():
            path = path if path.startswith("/") or not root.startswith("/") else "/" + path
            key = path[len(root):] if path.startswith(root) else path.split(self.root.strip("/") + "/", 1)[-1]
            out.append(Entry(key, _mtime(info), int(info.get("size") or 0)))
        return sorted(out, key=lambda e: e.key)

    def put_bytes(self, key: str, data: bytes) -> None:
        """A small object written whole: one put, tried again if the transport fails (a put that
        was applied but not answered is the same put again)."""
        self._call(key, lambda: self.fs.pipe_file(self._path(key), data))

    def swap(self, key: str, old: bytes | None, new: bytes) -> bool:
        """Compare-and-swap: on S3 a conditional put (``If-Match`` the ETag read, or
        ``If-None-Match: *`` for a new key); elsewhere read, compare and put, which is only as
        safe as the store's own consistency (fsspec has no conditional write)."""
        call_s3 = getattr(self.fs, "call_s3", None)
        etag = None
        if call_s3 is not None:  # the ETag first, then the bytes: a write between them fails the put
            try:
                info = self._call(key, lambda: self.fs.info(self._path(key), refresh=True))
                etag = info.get("ETag") or info.get("etag")
            except FileNotFoundError:
                etag = None
        try:
            current = self.read_all(key, 1 << 24)
        except FileNotFoundError:
            current = None
        if current != old or (current is not None and call_s3 is not None and not etag):
            return False
        if call_s3 is None:
            self.put_bytes(key, new)
            return True
        bucket, _, path = self._path(key).lstrip("/").partition("/")
        cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}

        def put() -> bool:
            try:
                call_s3("put_object", Bucket=bucket, Key=path, Body=new, **cond)
                return True
            except Exception as e:  # s3fs turns botocore's ClientError into an OSError of its own
                said = f"{e!r} {e}".lower()
                if any(w in said for w in ("precondition", "pre-condition", "412", "conditionalrequestconflict")):
                    return False  # someone else wrote first (or a retry of our own applied put)
                raise

        done = self._call(key, put)
        self.fs.invalidate_cache(self._path(key))
        return done

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call(key, lambda: self.fs.rm_file(self._path(key)))

    def clean_temporaries(self, prefix: str, older_than: float) -> int:
        return 0  # an upload appears whole or not at all; what a killed one leaves is gc's (abort_uploads)

    def abort_uploads(self, older_than: float) -> int:
        """Abort the multipart uploads to keys of this store begun more than ``older_than`` seconds
        ago (a push killed mid-upload leaves one, which the store keeps and bills until aborted).
        One listing for the whole store."""
        call_s3 = getattr(self.fs, "call_s3", None)
        if call_s3 is None:
            return 0  # other object stores: an upload appears whole or not at all
        bucket, _, base = self.root.strip("/").partition("/")
        base = base + "/" if base else ""
        found = self._call("", lambda: call_s3("list_multipart_uploads", Bucket=bucket, Prefix=base))
        gone = 0
        for up in found.get("Uploads", []) if isinstance(found, dict) else []:
            started, key = up.get("Initiated"), up.get("Key")
            age = time.time() - started.timestamp() if isinstance(started, _dt.datetime) else 0
            if not isinstance(key, str) or not isinstance(up.get("UploadId"), str) or age <= older_than:
                continue
            try:
                parts(key[len(base):])  # only what this store's layout names
            except AptBundleError:
                continue
            self._call(key, lambda u=up: call_s3("abort_multipart_upload", Bucket=bucket, Key=u["Key"],
                                                 UploadId=u["UploadId"]))
            gone += 1
        return gone


# the client libraries' own retries, off: ``retrying`` is the one policy (s3fs and botocore would
# otherwise multiply, up to 50 attempts at one PUT)
_NO_CLIENT_RETRIES = {p: {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}} for p in ("s3", "s3a")}


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

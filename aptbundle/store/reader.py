"""Reading a version-2 store: objects decoded (delta bases first), recipes parsed, files assembled.

``ObjectReader`` is the one way objects come out of a store (pull, check, upgrade and push's
delta bases): each object is size-capped before it is read, decoded strictly (``objects``) and
checked against its name; a delta's base is read the same way, at most ``MAX_CHAIN`` deep. The
objects decoded last are kept in memory (bounded), so pulling a run whose checkpoints are deltas
of each other decodes each base once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterator

from aptbundle.ground.errors import StoreError
from aptbundle.store import layout
from aptbundle.store.backend import Store
from aptbundle.store.objects import MAX_CHAIN, MAX_OBJECT, decode, head_bytes, parse_header
from aptbundle.store.recipes import MAX_RECIPE, Part, Recipe, parse_recipe

CACHE_BYTES = 512 << 20


class MissingObject(StoreError):
    """An object a recipe or a delta names is not in the store."""

    def __init__(self, message: str, sha256: str):
        super().__init__(message)
        self.sha256 = sha256


class ObjectReader:
    """Objects and recipes of one store, decoded and checked; recent objects cached."""

    def __init__(self, store: Store, cache_bytes: int = CACHE_BYTES, verify: bool = True):
        self.store, self.verify = store, verify  # verify=False: the caller hashes what it assembles
        self.cache: OrderedDict[str, bytes] = OrderedDict()
        self.cache_bytes, self.held = cache_bytes, 0
        self.fetched = 0  # objects read from the store (not from the cache)
        self._lock = threading.RLock()  # push reads bases from its encoding threads

    def object(self, sha256: str, size: int, depth: int = MAX_CHAIN) -> bytes | memoryview:
        """The bytes of object ``sha256`` (``size`` of them); ``depth``: how many deltas may
        still lie below it."""
        with self._lock:
            return self._object(sha256, size, depth)

    def recipe(self, sha256: str, size: int) -> Recipe:
        key = layout.recipe(sha256)
        raw = self.store.read(key, MAX_RECIPE)
        if raw is None:
            raise MissingObject(f"{self.store.where(key)}: the recipe of a listed file is not in the store; push the"
                                " run again", sha256)
        return parse_recipe(raw, sha256, size, self.store.where(key))

    def _object(self, sha256: str, size: int, depth: int) -> bytes | memoryview:
        hit = self.cache.get(sha256)
        if hit is not None:
            self.cache.move_to_end(sha256)
            return hit
        key = layout.object(sha256)
        shown = self.store.where(key)
        raw = self.store.read(key, MAX_OBJECT + (1 << 20))
        if raw is None:
            raise MissingObject(f"{shown}: an object the run needs is not in the store; `aptbundle check` names"
                                " the runs that need it, and their next push sends it again", sha256)
        self.fetched += 1
        head, _ = parse_header(raw, shown)
        if head.size != size:
            raise StoreError(f"{shown}: holds {head.size} bytes where {size} are needed; the store is damaged"
                             " or crafted")
        if head.base is not None and (head.depth > depth or head.base == sha256):
            raise StoreError(f"{shown}: a delta chain deeper than {MAX_CHAIN} or one that names itself; the"
                             " store is damaged or crafted")
        data = decode(sha256, raw, shown, lambda b, n, d: self._object(b, n, d), self.verify)
        self._keep(sha256, data)
        return data

    def forget(self) -> None:
        """Drop the decoded objects kept (before reading a file again that failed its hash)."""
        with self._lock:
            self.cache.clear()
            self.held = 0

    def _keep(self, sha256: str, data: bytes | memoryview) -> None:
        if len(data) > self.cache_bytes // 4:
            return
        self.cache[sha256] = data
        self.held += len(data)
        while self.held > self.cache_bytes:
            _, old = self.cache.popitem(last=False)
            self.held -= len(old)

    def part(self, p: Part) -> bytes | memoryview:
        return p.inline if p.inline is not None else self.object(p.sha256, p.size)

    def file(self, sha256: str, size: int) -> Iterator[bytes | memoryview]:
        """The bytes of a listed file, part by part (the caller hashes them end to end)."""
        recipe = self.recipe(sha256, size)
        for p in recipe.parts:
            yield self.part(p)

    def chain(self, sha256: str) -> tuple[str, ...]:
        """The bases a stored object's delta needs, read from the markers (small reads)."""
        out: list[str] = []
        at = sha256
        for _ in range(MAX_CHAIN + 1):
            key = layout.object(at)
            with self.store.open(key) as f:
                head, _ = parse_header(f.read(head_bytes()), self.store.where(key))
            if head.base is None:
                return tuple(out)
            if head.base in out or head.base == sha256:
                break
            out.append(head.base)
            at = head.base
        raise StoreError(f"{self.store.where(layout.object(sha256))}: a delta chain longer than {MAX_CHAIN}; the"
                         " store is damaged or crafted")

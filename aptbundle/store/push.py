"""``push``: copy a run into a store, sending only the tensors and files the store does not have.

Each file the store has no recipe for is cut into parts (``recipes.cuts``: a tensor, a storage
entry, a header) while it is hashed and scanned; each part the store lacks becomes an object in
the smallest encoding that applies (``objects.encode``): a float tensor grouped, or an XOR delta
against the same tensor of the run's previous checkpoint (read from the run on disk when it is
still there, else from the store). Write order: objects, recipes, the manifest (signature,
modes), then the ref, each all or nothing, so a reader following ref -> manifest -> recipes ->
objects never meets a missing piece, and a push killed at any point leaves the store listing
only complete versions (the next push sends what is missing).

A push asks the store only about the files and objects at hand (one lookup each), never lists
it: its cost grows with what it sends, not with the store. The ref is updated compare-and-swap
(``refs``), so two pushes of the same run at once both keep their version.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from aptbundle.format.manifest import FileEntry, Manifest
from aptbundle.format.stream import file_source
from aptbundle.format.verify import check_stream
from aptbundle.ground.errors import AptBundleError, VerifyError
from aptbundle.ground.fsutil import Progress, announce_total
from aptbundle.ground.problems import Problem, split
from aptbundle.store import layout, locks, refs
from aptbundle.store.backend import Store
from aptbundle.store.objects import MAX_CHAIN, encode
from aptbundle.store.pull import resolve
from aptbundle.store.reader import ObjectReader
from aptbundle.store.recipes import INLINE, Cut, Cutter, Part, Recipe, cuts
from aptbundle.transfer.codec import Encoding
from aptbundle.transfer.view import ReadView, file_mode, read_view


@dataclass
class PushResult:
    """What one push did, in files, objects and bytes."""

    store: str
    name: str
    digest: str
    files: int  # files the run lists
    sent_files: int  # files whose recipe this push wrote
    sent_bytes: int  # bytes written to the store (objects, recipes, manifest, signature, ref; not the lock)
    data_bytes: int  # original bytes of the files sent
    present_files: int  # files the store already had
    present_bytes: int  # their original bytes
    seconds: float
    signed: bool
    warnings: list[str] = field(default_factory=list)  # what the user should hear (a stale lock removed)
    sent_objects: int = 0  # objects written
    delta_objects: int = 0  # of which XOR deltas against the previous checkpoint
    present_objects: int = 0  # parts the store already had as objects (unchanged tensors)
    parent: str | None = None  # the version this one was pushed on top of

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def push(run_dir: str | Path, store_url: str | Path, *, sign: str | Path | None = None, dense: bool = False,
         level: int | None = None, threads: int = 0, checkpoints: str = "all",
         progress: Progress | None = None, before_ref: Callable[[], None] | None = None) -> PushResult:
    """Push a run into a store (a folder or an fsspec URL); only new tensors and files travel.

    ``sign`` is a private key file (``aptbundle keygen``). ``dense`` is accepted for older
    callers: grouping floats is what every push now does where it makes objects smaller.
    ``threads`` encode objects side by side (0: every core). ``before_ref`` is called when
    everything but the ref is written (concurrent pushes are synchronised on it in tests).
    """
    t0 = time.monotonic()
    enc = Encoding.choose(level, threads, False)
    store = Store(store_url)
    store.require(2, "push to")
    with read_view(run_dir, checkpoints=checkpoints, sign=sign, verb="pushed") as view:
        return _Push(store, view, enc, level, progress).run(t0, before_ref)


class _Push:
    def __init__(self, store: Store, view: ReadView, enc: Encoding, level: int | None, progress: Progress | None):
        self.store, self.view, self.progress = store, view, progress
        self.man: Manifest = view.manifest
        self.zlevel = level or 1  # planes of floats: level 1 compresses them as well as 3, twice as fast
        self.workers = max(1, enc.threads)
        self.reader = ObjectReader(store, cache_bytes=128 << 20)
        self.res = PushResult(store.url, self.man.name, self.man.digest(), len(self.man.files), 0, 0, 0, 0, 0, 0.0,
                              view.signature is not None)
        self._recipes: dict[str, Recipe | None] = {}
        self._count = threading.Lock()  # objects are encoded side by side

    def run(self, t0: float, before_ref: Callable[[], None] | None) -> PushResult:
        man, store, digest = self.man, self.store, self.res.digest
        versions, _raw = refs.read_ref(store, man.name)
        self.res.parent = versions[-1].digest if versions else None
        self.head = self._head_manifest(self.res.parent)
        unique: dict[str, FileEntry] = {}
        for f in sorted(man.files, key=self._order):  # older checkpoints first: the bases of the later
            unique.setdefault(f.sha256, f)
        announce_total(self.progress, sum(f.size for f in unique.values()))
        with locks.pushing(store, sorted(unique), digest) as lock:
            store.mark_version()
            problems: list[Problem] = []
            with ThreadPoolExecutor(self.workers, thread_name_prefix="aptbundle-encode") as pool:
                self.pool = pool
                for f in unique.values():
                    lock.refresh()
                    problems += self._file(f)
            if problems:
                raise VerifyError(problems, what=f"run {man.name} (not pushed; the store lists it as before)")
            if self.view.signature is not None:
                store.put(layout.signature(digest), self.view.signature)
            modes = {f.path: m for f in man.files if (m := file_mode(self.view.root / f.path)) != 0o644}
            if modes:
                store.put(layout.modes(digest), json.dumps(modes, sort_keys=True).encode())
            if not store.exists(layout.manifest(digest)):
                store.put(layout.manifest(digest), man.to_bytes())
            if before_ref is not None:
                before_ref()
            refs.add_version(store, man.name, digest, self.res.parent)
        self.res.sent_bytes, self.res.warnings = store.sent, store.warnings
        self.res.seconds = time.monotonic() - t0
        return self.res

    # -- which earlier file a file's tensors are deltas against ----------------------------
    def _head_manifest(self, digest: str | None) -> Manifest | None:
        if digest is None:
            return None
        try:
            return resolve(self.store, self.man.name, digest)[2]
        except AptBundleError:
            return None  # no deltas against a version that cannot be read; the push goes on

    def _place(self, man: Manifest | None, path: str) -> tuple[int, str] | None:
        """``(step, path inside the checkpoint)`` of a file in a checkpoint of ``man``."""
        for c in man.checkpoints if man is not None else []:
            if path.startswith(c.folder + "/"):
                return c.step, path[len(c.folder) + 1:]
        return None

    def _order(self, f: FileEntry) -> tuple[int, str]:
        where = self._place(self.man, f.path)
        return (where[0] if where else -1, f.path)

    def _base_file(self, f: FileEntry) -> tuple[FileEntry, bool] | None:
        """The same file in the nearest earlier checkpoint (of this push or the version before),
        and whether it is on disk in this run."""
        where = self._place(self.man, f.path)
        if where is None:
            return None
        step, inner = where
        best: tuple[int, FileEntry, bool] | None = None
        for man, local in ((self.man, True), (self.head, False)):
            for c in man.checkpoints if man is not None else []:
                if c.step >= step or (best is not None and c.step <= best[0]):
                    continue
                e = next((x for x in man.files if x.path == f"{c.folder}/{inner}"), None)
                if e is not None:
                    best = (c.step, e, local)
        return (best[1], best[2]) if best else None

    def _recipe_of(self, e: FileEntry) -> Recipe | None:
        if e.sha256 not in self._recipes:
            try:
                self._recipes[e.sha256] = self.reader.recipe(e.sha256, e.size)
            except AptBundleError:
                self._recipes[e.sha256] = None
        return self._recipes[e.sha256]

    def _bases(self, f: FileEntry) -> dict[str, tuple[Part, Callable[[], bytes | None]]]:
        """For each part name of ``f``'s base file: the part, and how to read its bytes."""
        found = self._base_file(f)
        if found is None:
            return {}
        e, local = found
        recipe = self._recipe_of(e)
        if recipe is None:
            return {}
        path = self.view.root / e.path if local else None
        out = {}
        offset = 0
        for p in recipe.parts:
            out[p.name] = (p, lambda p=p, off=offset: self._base_bytes(p, path, off))
            offset += p.size
        return out

    def _base_bytes(self, p: Part, path: Path | None, offset: int) -> bytes | None:
        if p.sha256 is None:
            return None
        if path is not None:  # still on disk: read it there, and make sure it is what the store holds
            try:
                with open(path, "rb") as src:
                    src.seek(offset)
                    data = src.read(p.size)
                if len(data) == p.size and hashlib.sha256(data).hexdigest() == p.sha256:
                    return data
            except OSError:
                pass
        try:
            return self.reader.object(p.sha256, p.size)
        except AptBundleError:
            return None

    # -- one file ---------------------------------------------------------------------------
    def _file(self, f: FileEntry) -> list[Problem]:
        store, res = self.store, self.res
        if store.exists(layout.recipe(f.sha256)):
            res.present_files += 1
            res.present_bytes += f.size
            if self.progress:
                self.progress(f.size)
            return []
        path = self.view.root / f.path
        plan = cuts(path, f.path, f.size)
        bases = self._bases(f)
        pending: list[Future | Part] = []

        def take(cut: Cut, data: bytes) -> None:
            if cut.size < INLINE:
                pending.append(Part(cut.name, cut.size, inline=data))
                return
            while sum(1 for p in pending if isinstance(p, Future) and not p.done()) >= 2 * self.workers:
                next(p for p in pending if isinstance(p, Future) and not p.done()).result()
            pending.append(self.pool.submit(self._object, cut, data, bases.get(cut.name)))

        taps = [Cutter(plan, take)] + ([lambda b: self.progress(len(b))] if self.progress else [])
        with open(path, "rb", buffering=0) as src:
            problems, _notes = split(check_stream(file_source(src), f, taps=taps))
        parts = [p.result() if isinstance(p, Future) else p for p in pending]  # errors surface here
        if problems:
            return problems
        store.put(layout.recipe(f.sha256), Recipe(f.size, f.sha256, tuple(parts)).to_bytes())
        self._recipes[f.sha256] = Recipe(f.size, f.sha256, tuple(parts))
        res.sent_files += 1
        res.data_bytes += f.size
        return []

    def _object(self, cut: Cut, data: bytes, base: tuple[Part, Callable[[], bytes | None]] | None) -> Part:
        """The part ``data`` of a file: its object written if the store lacks it."""
        sha = hashlib.sha256(data).hexdigest()
        key = layout.object(sha)
        if self.store.exists(key):
            with self._count:
                self.res.present_objects += 1
            if base is not None and base[0].sha256 == sha:
                return Part(cut.name, cut.size, sha, chain=base[0].chain)
            return Part(cut.name, cut.size, sha, chain=self.reader.chain(sha))
        against = None
        if base is not None and cut.width and base[0].size == cut.size and len(base[0].chain) < MAX_CHAIN:
            raw = base[1]()
            if raw is not None:
                against = (base[0].sha256, raw, len(base[0].chain))
        body, head = encode(data, cut.width, against, self.zlevel)
        self.store.put(key, body)  # whole: on an object store one put, which a retry may repeat
        with self._count:
            self.res.sent_objects += 1
            self.res.delta_objects += head.base is not None
        if head.base is not None:
            return Part(cut.name, cut.size, sha, chain=(head.base, *base[0].chain))
        return Part(cut.name, cut.size, sha)

"""``ls``, ``log``, ``forget`` and ``gc`` of a store: what it holds, its history, and freeing space.

``forget`` drops versions from a run's ref in the manner of ``restic forget`` (keep the last N,
and the one holding the best checkpoint); ``gc`` then deletes what no kept version names: it
keeps every manifest a ref lists (with its signature and modes), every recipe of their files,
every object of those recipes and every base their deltas need, and anything younger than the
grace period (a push in progress writes objects before anything names them). ``gc`` waits for
running pushes to end, and pushes wait for a running gc (``locks``). A ref or a kept recipe that
cannot be read stops the gc before it deletes anything: a damaged store is reported, never
"cleaned".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from aptbundle.format.manifest import Manifest
from aptbundle.ground.errors import AptBundleError, StoreError, StoreLayoutError
from aptbundle.ground.temporaries import is_temp_name
from aptbundle.layouts import title
from aptbundle.store import layout, locks, refs
from aptbundle.store.backend import Store
from aptbundle.store.pull import resolve
from aptbundle.store.reader import MissingObject, ObjectReader

GRACE_S = 3600.0


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def run_refs(store: Store) -> list[tuple[str, float]]:
    """``(name, pushed time)`` of every ref in the store."""
    return [(name, e.mtime) for e in store.list(layout.REFS) if (name := layout.ref_name(e.key)) is not None]


def _summary(man: Manifest) -> dict:
    latest = next((c for c in man.checkpoints if c.name == man.latest), None)
    return {"files": len(man.files), "size": man.total_size(), "checkpoints": [c.name for c in man.checkpoints],
            "latest": man.latest, "step": latest.step if latest else 0,
            "best": man.best.name if man.best else None}


def list_store(store_url: str | Path) -> list[dict]:
    """One dict per run in the store: name, digest, checkpoints, latest step, sizes, signed, pushed.

    A run whose ref or manifest is unreadable is listed with an ``error`` instead.
    """
    store = Store.existing(store_url)
    v2 = store.version == 2
    sizes = {layout.base(e.key): e.size for e in store.list(layout.OBJECTS if v2 else layout.BLOBS)}
    reader = ObjectReader(store)
    out = []
    for name, mtime in run_refs(store):
        try:
            versions, _ = refs.read_ref(store, name)
            digest, _data, man, sig = resolve(store, name)
            needed, missing = _needs(reader, man) if v2 else ({f.sha256 for f in man.files}, 0)
        except StoreLayoutError:
            raise  # a crafted store is refused whole, not listed
        except AptBundleError as e:
            out.append({"name": name, "error": str(e)})
            continue
        missing += sum(1 for s in needed if s not in sizes)
        out.append({
            "name": man.name, "digest": digest, "pushed_at": _when(versions[-1].time or mtime),
            "versions": len(versions), **_summary(man),
            "stored_size": sum(sizes.get(s, 0) for s in needed), "missing_blobs": missing,
            "signed": sig is not None, "framework": title(man.layout), "trainer": man.trainer,
        })
    return out


def _needs(reader: ObjectReader, man: Manifest) -> tuple[set[str], int]:
    """The objects a version needs, and how many of its recipes are missing."""
    objs: set[str] = set()
    missing = 0
    for f in {f.sha256: f for f in man.files}.values():
        try:
            objs.update(reader.recipe(f.sha256, f.size).objects())
        except MissingObject:
            missing += 1
    return objs, missing


def log(store_url: str | Path, name: str) -> list[dict]:
    """The pushed versions of run ``name``, oldest first: digest, parent, time, steps,
    checkpoints, size, and ``fork`` where a version was pushed on top of another than the one
    before it (two machines pushing at once)."""
    store = Store.existing(store_url)
    versions, _ = refs.read_ref(store, name)
    if not versions:
        raise StoreError(f"{store.where(layout.ref(name))}: no such run in the store; `aptbundle ls {store.url}`"
                         " lists what it holds")
    out = []
    for i, v in enumerate(versions):
        row = {"digest": v.digest, "parent": v.parent, "pushed_at": _when(v.time),
               "fork": v.parent is not None and i > 0 and v.parent != versions[i - 1].digest}
        try:
            row.update(_summary(resolve(store, name, v.digest)[2]))
        except AptBundleError as e:
            row["error"] = str(e)
        out.append(row)
    return out


@dataclass
class ForgetResult:
    name: str
    kept: list[str]
    forgotten: list[str]
    dry_run: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def forget(store_url: str | Path, name: str, *, keep_last: int, keep_best: bool = False,
           dry_run: bool = False) -> ForgetResult:
    """Drop all but the last ``keep_last`` versions of ``name`` (and, with ``keep_best``, the newest
    version holding the best checkpoint any version names); ``gc`` then frees their data."""
    if keep_last < 1:
        raise StoreError(f"--keep-last {keep_last}: keep at least one version (the newest)")
    store = Store.existing(store_url)
    store.require(2, "forget versions in")
    versions, _ = refs.read_ref(store, name)
    if not versions:
        raise StoreError(f"{store.where(layout.ref(name))}: no such run in the store")
    keep = {v.digest for v in versions[-keep_last:]}
    if keep_best:
        best = None
        for v in versions:
            try:
                b = resolve(store, name, v.digest)[2].best
            except AptBundleError:
                continue
            if b is not None and (best is None or (b.value < best[0] if b.mode == "min" else b.value > best[0])
                                  or b.value == best[0]):
                best = (b.value, v.digest)
        if best is not None:
            keep.add(best[1])

    def change(now: list[refs.Version]) -> list[refs.Version]:
        # versions pushed while we looked are newer than everything we judged: they stay
        judged = {v.digest for v in versions}
        return [v for v in now if v.digest in keep or v.digest not in judged]

    kept = [v.digest for v in versions if v.digest in keep]
    gone = [v.digest for v in versions if v.digest not in keep]
    if not dry_run and gone:
        refs.update(store, name, change)
    return ForgetResult(name, kept, gone, dry_run)


@dataclass
class GcResult:
    deleted_blobs: int  # objects (and version-1 blobs) deleted
    deleted_manifests: int
    deleted_bytes: int
    kept_blobs: int  # objects kept because a version needs them
    kept_young: int  # unreferenced, but younger than the grace period
    dry_run: bool
    warnings: list[str] = field(default_factory=list)  # what the user should hear (a stale lock removed)
    deleted_recipes: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def kept(store: Store) -> tuple[set[str], set[str], set[str]]:
    """``(manifests, recipes, objects)`` that some version in some ref names."""
    reader = ObjectReader(store, cache_bytes=0)
    manifests: set[str] = set()
    recipes: dict[str, int] = {}
    for name, _ in run_refs(store):
        try:
            versions, _raw = refs.read_ref(store, name)
            for v in versions:
                man = resolve(store, name, v.digest)[2]
                manifests.add(v.digest)
                recipes.update((f.sha256, f.size) for f in man.files)
        except AptBundleError as e:
            raise StoreError(f"{e}. gc deletes nothing while a ref cannot be followed; fix or delete"
                             f" {store.where(layout.ref(name))} first") from None
    objects: set[str] = set()
    for sha, size in recipes.items():
        try:
            objects.update(reader.recipe(sha, size).objects())
        except MissingObject:
            continue  # nothing of it to keep (check names it)
        except AptBundleError as e:
            raise StoreError(f"{e}. gc deletes nothing while a recipe cannot be read; run `aptbundle check"
                             f" {store.url}` first") from None
    return manifests, set(recipes), objects


def gc(store_url: str | Path, *, grace_s: float = GRACE_S, dry_run: bool = False,
       wait_s: float = locks.GC_WAIT_S) -> GcResult:
    """Delete objects, recipes and manifests that no kept version reaches (and older than
    ``grace_s`` seconds); waits up to ``wait_s`` for running pushes to end first."""
    store = Store.existing(store_url)
    store.require(2, "gc")
    with locks.collecting(store, wait_s) as lock:
        keep_manifests, keep_recipes, keep_objects = kept(store)
        now = time.time()
        res = GcResult(0, 0, 0, 0, 0, dry_run, store.warnings)
        # manifests first, objects last: a gc killed half-way leaves only unnamed things behind
        for prefix, keep in ((layout.MANIFESTS, keep_manifests), (layout.RECIPES, keep_recipes),
                             (layout.OBJECTS, keep_objects), (layout.BLOBS, set())):
            for key, mtime, size in store.list(prefix):
                lock.refresh()
                base = layout.base(key)
                if is_temp_name(base):
                    continue  # a local push's file in progress: clean_stale_temporaries decides
                if layout.digest_of(key) in keep:
                    res.kept_blobs += prefix == layout.OBJECTS
                    continue
                if now - mtime < grace_s:
                    res.kept_young += 1
                    continue
                if not dry_run:
                    store.delete(key)
                res.deleted_bytes += size
                if prefix in (layout.OBJECTS, layout.BLOBS):
                    res.deleted_blobs += 1
                elif prefix == layout.RECIPES:
                    res.deleted_recipes += 1
                else:
                    res.deleted_manifests += not base.endswith((layout.SIG_SUFFIX, layout.MODES_SUFFIX))
        if not dry_run:
            for prefix in layout.TOPS:
                store.clean_stale_temporaries(prefix, max(grace_s, locks.STALE_S))
            store.abort_stale_uploads(grace_s)
    return res

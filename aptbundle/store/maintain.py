"""``ls`` and ``gc`` of a store: what it holds, and removing what nothing references.

``gc`` keeps every manifest a ref names (with its signature), every blob those manifests list,
everything a running push has announced in its lock (``locks``), and anything younger than the
grace period (an older aptbundle, or another tool, may be between writing a blob and its
manifest). A ref whose manifest cannot be read stops the gc before it deletes anything: a
damaged store is reported, never "cleaned".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from aptbundle.format.manifest import MAX_MANIFEST_BYTES, parse_manifest
from aptbundle.ground.errors import AptBundleError, StoreError, StoreLayoutError
from aptbundle.ground.temporaries import is_temp_name
from aptbundle.layouts import title
from aptbundle.store import layout, locks
from aptbundle.store.backend import Store
from aptbundle.store.pull import resolve

GRACE_S = 3600.0


def run_refs(store: Store) -> list[tuple[str, float]]:
    """``(name, pushed time)`` of every ref in the store."""
    return [(name, e.mtime) for e in store.list(layout.REFS) if (name := layout.ref_name(e.key)) is not None]


def list_store(store_url: str | Path) -> list[dict]:
    """One dict per run in the store: name, digest, checkpoints, latest step, sizes, signed, pushed.

    A run whose ref or manifest is unreadable is listed with an ``error`` instead.
    """
    store = Store.existing(store_url)
    blob_sizes = {layout.base(e.key): e.size for e in store.list(layout.BLOBS)}
    out = []
    for name, mtime in run_refs(store):
        try:
            digest, _data, man, sig = resolve(store, name)
        except StoreLayoutError:
            raise  # a crafted store is refused whole, not listed
        except AptBundleError as e:
            out.append({"name": name, "error": str(e)})
            continue
        shas = {f.sha256 for f in man.files}
        latest = next((c for c in man.checkpoints if c.name == man.latest), None)
        out.append({
            "name": man.name, "digest": digest, "pushed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime)),
            "files": len(man.files), "size": man.total_size(),
            "stored_size": sum(blob_sizes.get(s, 0) for s in shas),
            "missing_blobs": sum(1 for s in shas if s not in blob_sizes),
            "checkpoints": [c.name for c in man.checkpoints], "latest": man.latest,
            "step": latest.step if latest else 0, "best": man.best.name if man.best else None,
            "signed": sig is not None, "framework": title(man.layout), "trainer": man.trainer,
        })
    return out


@dataclass
class GcResult:
    deleted_blobs: int
    deleted_manifests: int
    deleted_bytes: int
    kept_blobs: int
    kept_young: int  # unreferenced, but younger than the grace period
    dry_run: bool
    warnings: list[str] = field(default_factory=list)  # what the user should hear (a stale lock removed)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def gc(store_url: str | Path, *, grace_s: float = GRACE_S, dry_run: bool = False) -> GcResult:
    """Delete blobs and manifests that no ref reaches (and older than ``grace_s`` seconds)."""
    store = Store.existing(store_url)
    with locks.collecting(store) as (lock, pushing_blobs, pushing_manifests):
        keep_manifests = set(pushing_manifests)
        keep_blobs = set(pushing_blobs)
        for name, _ in run_refs(store):
            try:
                digest, _data, man, _sig = resolve(store, name)
            except AptBundleError as e:
                raise StoreError(f"{e}. gc deletes nothing while a ref cannot be followed; fix or delete"
                                 f" {store.where(layout.ref(name))} first") from None
            keep_manifests.add(digest)
            keep_blobs.update(f.sha256 for f in man.files)
        for digest in list(pushing_manifests):  # a push in flight keeps what its manifest lists
            data = store.read(layout.manifest(digest), MAX_MANIFEST_BYTES) if layout.is_digest(digest) else None
            if data is not None:
                try:
                    keep_blobs.update(f.sha256 for f in parse_manifest(data).files)
                except AptBundleError:
                    pass
        now = time.time()
        res = GcResult(0, 0, 0, 0, 0, dry_run, store.warnings)
        for prefix, keep in ((layout.BLOBS, keep_blobs), (layout.MANIFESTS, keep_manifests)):
            for key, mtime, size in store.list(prefix):
                lock.refresh()
                base = layout.base(key)
                if is_temp_name(base):
                    continue  # a local push's file in progress: clean_stale_temporaries decides
                if layout.digest_of(key) in keep:
                    res.kept_blobs += prefix == layout.BLOBS
                    continue
                if now - mtime < grace_s:
                    res.kept_young += 1
                    continue
                if not dry_run:
                    store.delete(key)
                res.deleted_bytes += size
                if prefix == layout.BLOBS:
                    res.deleted_blobs += 1
                else:
                    res.deleted_manifests += not base.endswith(layout.SIG_SUFFIX)
        if not dry_run:
            for prefix in layout.TOPS:
                store.clean_stale_temporaries(prefix, max(grace_s, locks.STALE_S))
                store.abort_stale_uploads(prefix, grace_s)
    return res

"""``push``: copy a run into a store, sending only the files the store does not have yet.

Layout (see DESIGN.md)::

    STORE/blobs/sha256/ab/abcd…        one file's bytes, zstd (``blobs``), by its SHA-256
    STORE/manifests/sha256/12/1234…    a run's manifest, by run digest (+ ``.sig`` when signed)
    STORE/refs/NAME                    the digest of the run's newest pushed manifest

Write order: blobs, then the manifest (and its signature), then the ref, each all or nothing,
so a reader following ref -> manifest -> blobs never meets a missing blob, and a push killed
at any point leaves the store listing only complete runs (the next push sends what is missing).
Files are read from a hard-link view taken under the run's commit lock (as ``pack`` does), so
a trainer may keep committing and retiring checkpoints while a push runs, and each file is
hashed and scanned as it is compressed: a file that no longer matches its entry is never
stored.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from aptbundle.archive.writer import _snapshot, carried_signature, refuse, select_checkpoints
from aptbundle.format import signature
from aptbundle.format.manifest import FileEntry, Manifest
from aptbundle.format.run import Run
from aptbundle.format.verify import verify_run
from aptbundle.ground import temporaries
from aptbundle.ground.errors import VerifyError
from aptbundle.ground.fsutil import Progress, announce_total
from aptbundle.store import locks
from aptbundle.store.backend import Store
from aptbundle.store.blobs import blob_key, write_blob


def manifest_key(digest: str) -> str:
    return f"manifests/sha256/{digest[:2]}/{digest}"


def ref_key(name: str) -> str:
    return f"refs/{name}"


@dataclass
class PushResult:
    """What one push did, in files and bytes."""

    store: str
    name: str
    digest: str
    files: int  # files the run lists
    sent_files: int  # blobs written by this push
    sent_bytes: int  # bytes written to the store (blobs, manifest, signature, ref; not the lock)
    data_bytes: int  # original bytes of the blobs written
    present_files: int  # blobs the store already had
    present_bytes: int  # their original bytes
    seconds: float
    signed: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def push(run_dir: str | Path, store_url: str | Path, *, sign: str | Path | None = None, dense: bool = False,
         level: int | None = None, threads: int = 0, checkpoints: str = "all",
         progress: Progress | None = None) -> PushResult:
    """Push a run into a store (a folder or an fsspec URL); only new files travel.

    ``sign`` is a private key file (``aptbundle keygen``). ``dense`` byte-groups float tensors
    (blobs only aptbundle can read). The run is verified (sizes) first and each file sent is
    hashed and scanned as it goes.

    >>> # push("outputs/run1", "s3://bucket/runs").sent_bytes
    """
    t0 = time.monotonic()
    level = level if level is not None else (1 if dense else 3)
    threads = threads if threads > 0 else (os.cpu_count() or 1)
    if sign is not None:
        signature.load_private_key(sign)  # a bad key is refused before any work
    store = Store(store_url)
    run = Run.open(run_dir)
    temporaries.clean_stale(run.path, "pack")
    snap = None
    try:
        with run.reading():
            run.reload()
            man = select_checkpoints(run.manifest, checkpoints)
            only = None if checkpoints == "all" else [f.path for f in man.files]
            if not verify_run(run, only=only, quick=True).ok:
                refuse(run, verify_run(run, only=only).problems, "pushed")
            sig = signature.sign(man.name, man.digest(), sign) if sign is not None else carried_signature(run, man)
            snap = _snapshot(run.path, man)
            if snap is None:  # no hard links here: read in place, commits held off meanwhile
                return _push(store, run.path, man, sig, dense, level, threads, progress, t0)
        return _push(store, snap, man, sig, dense, level, threads, progress, t0)
    finally:
        if snap is not None:
            temporaries.remove(snap)


def _push(store: Store, root: Path, man: Manifest, sig: bytes | None, dense: bool, level: int, threads: int,
          progress: Progress | None, t0: float) -> PushResult:
    digest = man.digest()
    unique: dict[str, FileEntry] = {}
    for f in man.files:
        unique.setdefault(f.sha256, f)
    announce_total(progress, sum(f.size for f in unique.values()))
    sent_files = data_bytes = present_files = present_bytes = 0
    with locks.pushing(store, sorted(unique), digest) as lock:
        store.clean_stale_temporaries("blobs", locks.STALE_S)
        listed = store.keys_below("blobs")  # after the lock: a gc from now on keeps what we count on
        problems = []
        for sha, f in unique.items():
            lock.refresh()
            if blob_key(sha) in listed if listed is not None else store.exists(blob_key(sha)):
                present_files += 1
                present_bytes += f.size
                if progress:
                    progress(f.size)
                continue
            found = write_blob(store, root, f, level=level, threads=threads, dense=dense,
                               tap=(lambda b: progress(len(b))) if progress else None)
            if found:
                problems += found
                continue
            sent_files += 1
            data_bytes += f.size
        if problems:
            raise VerifyError(problems, what=f"run {man.name} (not pushed; the store lists it as before)")
        mkey = manifest_key(digest)
        if sig is not None:
            store.put(mkey + ".sig", sig)
        if not store.exists(mkey):
            store.put(mkey, man.to_bytes())
        store.put(ref_key(man.name), (digest + "\n").encode())
    return PushResult(store.url, man.name, digest, len(man.files), sent_files, store.sent, data_bytes,
                      present_files, present_bytes, time.monotonic() - t0, sig is not None)


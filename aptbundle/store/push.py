"""``push``: copy a run into a store, sending only the files the store does not have yet.

Write order: blobs, then the manifest (and its signature), then the ref, each all or nothing
(``layout`` names the keys), so a reader following ref -> manifest -> blobs never meets a
missing blob, and a push killed at any point leaves the store listing only complete runs (the
next push sends what is missing). Files are read through the read view (``transfer.view``), as
``pack`` reads them, so a trainer may keep committing and retiring checkpoints while a push
runs, and each file is hashed and scanned as it is compressed: a file that no longer matches its
entry is never stored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from aptbundle.format.manifest import FileEntry
from aptbundle.ground.errors import VerifyError
from aptbundle.ground.fsutil import Progress, announce_total
from aptbundle.store import layout, locks
from aptbundle.store.backend import Store
from aptbundle.store.blobs import write_blob
from aptbundle.transfer.codec import Encoding
from aptbundle.transfer.view import ReadView, read_view


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
    warnings: list[str] = field(default_factory=list)  # what the user should hear (a stale lock removed)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def push(run_dir: str | Path, store_url: str | Path, *, sign: str | Path | None = None, dense: bool = False,
         level: int | None = None, threads: int = 0, checkpoints: str = "all",
         progress: Progress | None = None) -> PushResult:
    """Push a run into a store (a folder or an fsspec URL); only new files travel.

    ``sign`` is a private key file (``aptbundle keygen``). ``dense`` byte-groups float tensors
    (blobs only aptbundle can read). The run is verified (sizes) first and each file sent is
    hashed and scanned as it goes.
    """
    t0 = time.monotonic()
    enc = Encoding.choose(level, threads, dense)
    store = Store(store_url)
    with read_view(run_dir, checkpoints=checkpoints, sign=sign, verb="pushed") as view:
        return _send(store, view, enc, progress, t0)


def _send(store: Store, view: ReadView, enc: Encoding, progress: Progress | None, t0: float) -> PushResult:
    man, digest = view.manifest, view.manifest.digest()
    unique: dict[str, FileEntry] = {}
    for f in man.files:
        unique.setdefault(f.sha256, f)
    announce_total(progress, sum(f.size for f in unique.values()))
    sent_files = data_bytes = present_files = present_bytes = 0
    with locks.pushing(store, sorted(unique), digest) as lock:
        store.clean_stale_temporaries(layout.BLOBS, locks.STALE_S)
        listed = store.keys_below(layout.BLOBS)  # after the lock: a gc from now on keeps what we count on
        problems = []
        for sha, f in unique.items():
            lock.refresh()
            key = layout.blob(sha)
            if key in listed if listed is not None else store.exists(key):
                present_files += 1
                present_bytes += f.size
                if progress:
                    progress(f.size)
                continue
            found = write_blob(store, view.root, f, enc, tap=(lambda b: progress(len(b))) if progress else None)
            if found:
                problems += found
                continue
            sent_files += 1
            data_bytes += f.size
        if problems:
            raise VerifyError(problems, what=f"run {man.name} (not pushed; the store lists it as before)")
        if view.signature is not None:
            store.put(layout.signature(digest), view.signature)
        if not store.exists(layout.manifest(digest)):
            store.put(layout.manifest(digest), man.to_bytes())
        store.put(layout.ref(man.name), (digest + "\n").encode())
    return PushResult(store.url, man.name, digest, len(man.files), sent_files, store.sent, data_bytes,
                      present_files, present_bytes, time.monotonic() - t0, view.signature is not None,
                      store.warnings)

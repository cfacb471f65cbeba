"""``store upgrade``: convert a version-1 store (one zstd blob per file) to version 2, in place.

Each run a ref names is pulled out of the version-1 store into a temporary folder (verified as
every pull is) and pushed back as version 2: tensors become objects, later checkpoints deltas of
earlier ones. Only then does the store's ``format`` say 2, and the blobs are deleted. A
conversion killed half-way leaves a version-1 store that reads as before (the objects written
so far are reused when it runs again).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aptbundle.ground.fsutil import Progress
from aptbundle.store import layout, locks
from aptbundle.store.backend import Store
from aptbundle.store.maintain import run_refs
from aptbundle.store.pull import pull
from aptbundle.store.push import _Push
from aptbundle.transfer.codec import Encoding
from aptbundle.transfer.view import read_view


@dataclass
class UpgradeResult:
    store: str
    was: int | None
    runs: int
    deleted_blobs: int
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def upgrade(store_url: str | Path, *, progress: Progress | None = None) -> UpgradeResult:
    """Convert the store at ``store_url`` to format version 2 (nothing to do if it is)."""
    t0 = time.monotonic()
    store = Store.existing(store_url)
    was = store.version
    if was != 1:
        return UpgradeResult(store.url, was, 0, 0, time.monotonic() - t0)
    names = [name for name, _ in run_refs(store)]
    with tempfile.TemporaryDirectory(prefix="aptbundle-upgrade-") as tmp:
        for name in names:
            pulled = pull(store.url, name, tmp, progress=progress)
            target = Store(store.url)
            target.mark_version(write=False)  # written as version 2 while the store still says 1
            with read_view(pulled.path, verb="converted") as view:
                _Push(target, view, Encoding.choose(None, 0, False), None, None).run(time.monotonic(), None)
    with locks.collecting(store):
        store.put(layout.FORMAT, layout.FORMAT_TEXT)
        gone = 0
        for e in store.list(layout.BLOBS):
            store.delete(e.key)
            gone += 1
    return UpgradeResult(store.url, was, len(names), gone, time.monotonic() - t0)

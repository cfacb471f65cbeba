"""``pull``: bring a run out of a store into ``DEST/NAME``, verified, fetching only what is new.

The guarantees are ``unpack``'s, and so is the code that makes the run appear: the
materializer of ``transfer``. The ref, the manifest and every blob are hostile until checked
(the ref must be a digest, the manifest must hash to it and pass the manifest rules, every file
is hashed and scanned as it streams), files are created by aptbundle itself inside a fresh
temporary folder beside ``DEST/NAME``, and that folder takes ``NAME``'s place only when
everything checked out; on any problem nothing is left behind. With ``--trust`` the manifest's
signature is checked before any blob is fetched.

When ``DEST/NAME`` already holds a version of the run, its files whose hash the new manifest
names are reused (hard-linked and hashed again on the way), so only missing files travel. The
old copy is replaced only under the materializer's rules: the same run, an ancestor of what is
pulled, nothing in it that its manifest does not list; else the pull is refused before anything
is fetched, or, with ``force``, the old copy is moved aside (never deleted).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from aptbundle.format import signature
from aptbundle.format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, SIGNATURE_NAME, FileEntry, Manifest, \
    parse_manifest
from aptbundle.format.stream import file_source
from aptbundle.format.verify import check_stream
from aptbundle.ground.errors import StoreError, VerifyError
from aptbundle.ground.fsutil import Progress, announce_total
from aptbundle.ground.problems import Problem, split
from aptbundle.store import layout
from aptbundle.store.backend import Store
from aptbundle.store.blobs import read_blob
from aptbundle.transfer.materialize import Materializer, check_replace, materialize


@dataclass
class PullResult:
    """What one pull did."""

    path: str
    name: str
    digest: str
    files: int
    fetched_files: int
    fetched_bytes: int  # original bytes of the files fetched from the store
    reused_files: int  # files taken from the older version in DEST
    reused_bytes: int
    seconds: float
    signed_by: str | None
    moved_aside: str | None = None  # where --force put the copy that was in the way

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def resolve(store: Store, name: str, digest: str | None = None) -> tuple[str, bytes, Manifest, bytes | None]:
    """``(digest, manifest bytes, manifest, signature)`` of run ``name`` (its newest version, or
    the one with ``digest``), every piece checked against the others."""
    rkey = layout.ref(name)
    if digest is None:
        raw = store.read(rkey, layout.MAX_REF_BYTES)
        if raw is None:
            raise StoreError(f"{store.where(rkey)}: no such run in the store; `aptbundle ls {store.url}`"
                             " lists what it holds")
        digest = raw.decode("ascii", "replace").strip()
        if not layout.is_digest(digest):
            raise StoreError(f"{store.where(rkey)}: is not a run digest (64 hex digits); the store is"
                             " damaged or crafted")
    mkey = layout.manifest(digest)
    data = store.read(mkey, MAX_MANIFEST_BYTES)
    if data is None:
        raise StoreError(f"{store.where(mkey)}: the manifest of {name} at {digest[:16]}… is missing from the"
                         " store; push the run again")
    man = parse_manifest(data, store.where(mkey))
    if man.digest() != digest:
        raise StoreError(f"{store.where(mkey)}: its digest is {man.digest()}, not the {digest} it is stored"
                         " under; the store is damaged or crafted")
    if man.name != name:
        raise StoreError(f"{store.where(mkey)}: is the manifest of run {man.name!r}, not {name!r}; the store is"
                         " damaged or crafted")
    return digest, data, man, store.read(layout.signature(digest), signature.MAX_SIGNATURE_BYTES)


def pull(store_url: str | Path, name: str, dest: str | Path = ".", *, digest: str | None = None,
         trust: list[str | Path] | None = None, progress: Progress | None = None,
         max_size: int | None = None, strict: bool = False, force: bool = False) -> PullResult:
    """Pull run ``name`` (its newest version, or the one with ``digest``) into ``DEST/NAME``.

    ``force``: a copy at ``DEST/NAME`` that may not be replaced (another run, a newer state,
    files of the user's) is moved aside to ``NAME.old-TIME`` instead of refusing the pull.
    """
    t0 = time.monotonic()
    keys = [signature.load_public_key(k) for k in trust or []]
    store = Store.existing(store_url)
    digest, data, man, sig = resolve(store, name, digest)
    what = f"{store.url}/{man.name}"
    signer = signature.check(sig, man.name, digest, keys, what) if keys else None
    existing = check_replace(Path(dest) / man.name, man, force=force, what=f"the version from {store.url}")
    old = existing.run if existing is not None else None
    by_hash = {f.sha256: old.path / f.path for f in old.manifest.files} if old is not None else {}
    counts = {"fetched": [0, 0], "reused": [0, 0]}
    with materialize(dest, man.name, declared=sum(f.size for f in man.files if f.sha256 not in by_hash),
                     max_size=max_size, shown=what, existing=existing, replacing=True) as out:
        if old is not None and existing.aside is None:  # asked again under the old copy's writer lock
            check_replace(out.final, man, force=False, what=f"the version from {store.url}")
        announce_total(progress, man.total_size())
        problems: list[Problem] = []
        for f in man.files:
            kind, found = _place(store, f, out, by_hash.get(f.sha256), progress)
            problems += split(found, strict)[0]
            counts[kind][0] += 1
            counts[kind][1] += f.size
        if problems:
            raise VerifyError(problems, what=f"{what} at {digest[:16]}… (not pulled)")
        out.write(MANIFEST_NAME, data)
        if sig is not None:
            out.write(SIGNATURE_NAME, sig)
        final = out.finish(man)
    aside = existing.aside if existing is not None else None
    return PullResult(str(final), man.name, digest, len(man.files), *counts["fetched"], *counts["reused"],
                      time.monotonic() - t0, signer.keyid if signer else None, str(aside) if aside else None)


def _place(store: Store, f: FileEntry, out: Materializer, local: Path | None,
           progress: Progress | None) -> tuple[str, list[Problem]]:
    """Create ``f`` in ``out``: from the old copy if it is intact there, else from the store."""
    taps = [lambda b: progress(len(b))] if progress else []
    if local is not None:
        target = None
        try:
            target = out.link_from(local, f.path)
            with open(target, "rb", buffering=0) as src:
                if not split(check_stream(file_source(src), f, taps=taps))[0]:
                    return "reused", []
            target.unlink()
        except OSError:
            if target is not None:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
    tries = 2 if store.remote else 1  # a body damaged on the way is read once more
    for attempt in range(tries):
        with out.create(f.path) as dst:
            found = read_blob(store, f, [dst.write, *taps])
        if not split(found)[0] or attempt == tries - 1:  # notes (an untrusted file carried) are no failure
            return "fetched", found
        (out.tmp / f.path).unlink()
    raise AssertionError("unreachable")

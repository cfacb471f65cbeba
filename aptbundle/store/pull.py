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
import json
import time
from dataclasses import dataclass
from pathlib import Path

from aptbundle.format import signature
from aptbundle.format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, SIGNATURE_NAME, FileEntry, Manifest, \
    parse_manifest
from aptbundle.format.stream import file_source
from aptbundle.format.verify import check_stream
from aptbundle.ground.errors import AptBundleError, StoreError, VerifyError
from aptbundle.ground.values import DuplicateKey, unique_keys
from aptbundle.ground.fsutil import Progress, announce_total
from aptbundle.ground.problems import Kind, Problem, split
from aptbundle.store import layout, refs
from aptbundle.store.backend import Store
from aptbundle.store.blobs import read_blob
from aptbundle.store.reader import MissingObject, ObjectReader
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
    fetched_objects: int = 0  # objects read from the store (delta bases included)
    checkpoints: list[str] | None = None  # the checkpoints the pulled run holds

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def resolve(store: Store, name: str, digest: str | None = None) -> tuple[str, bytes, Manifest, bytes | None]:
    """``(digest, manifest bytes, manifest, signature)`` of run ``name`` (its newest version, or
    the one with ``digest``), every piece checked against the others."""
    if digest is None:
        versions, _raw = refs.read_ref(store, name)
        if not versions:
            raise StoreError(f"{store.where(layout.ref(name))}: no such run in the store; `aptbundle ls {store.url}`"
                             " lists what it holds")
        digest = versions[-1].digest
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


def modes_of(store: Store, digest: str) -> dict[str, int]:
    """The modes a version's files had, where not 0644 (empty when the store recorded none)."""
    raw = store.read(layout.modes(digest), 16 << 20)
    try:
        found = json.loads(raw, object_pairs_hook=unique_keys) if raw is not None else {}
    except (ValueError, DuplicateKey):
        found = None
    if not isinstance(found, dict) or not all(isinstance(k, str) and type(v) is int and 0 <= v <= 0o777
                                              for k, v in found.items()):
        raise StoreError(f"{store.where(layout.modes(digest))}: not a map of file modes; the store is damaged or"
                         " crafted")
    return found


def pull(store_url: str | Path, name: str, dest: str | Path = ".", *, digest: str | None = None,
         trust: list[str | Path] | None = None, progress: Progress | None = None,
         max_size: int | None = None, strict: bool = False, force: bool = False,
         checkpoints: str = "all") -> PullResult:
    """Pull run ``name`` (its newest version, or the one with ``digest``) into ``DEST/NAME``.

    ``checkpoints``: ``all``, ``latest``, ``best`` or a checkpoint's name; only what that
    selection lists is fetched, and the pulled run lists what it holds. ``force``: a copy at
    ``DEST/NAME`` that may not be replaced (another run, a newer state, files of the user's) is
    moved aside to ``NAME.old-TIME`` instead of refusing the pull.
    """
    t0 = time.monotonic()
    keys = [signature.load_public_key(k) for k in trust or []]
    store = Store.existing(store_url)
    digest, data, full, sig = resolve(store, name, digest)
    what = f"{store.url}/{full.name}"
    signer = signature.check(sig, full.name, digest, keys, what) if keys else None
    man = full.select(checkpoints)
    if checkpoints != "all":  # the pulled run is a run of its own: its manifest lists what it holds
        data, sig = man.to_bytes(), None
    modes = modes_of(store, digest) if store.version == 2 else {}
    # objects are not hashed one by one: every file is, end to end, as it is assembled
    source = ObjectReader(store, verify=False) if store.version == 2 else None
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
            kind, found = _place(store, source, f, out, by_hash.get(f.sha256), progress, modes.get(f.path, 0o644))
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
                      time.monotonic() - t0, signer.keyid if signer else None, str(aside) if aside else None,
                      source.fetched if source is not None else counts["fetched"][0],
                      [c.name for c in man.checkpoints])


def _place(store: Store, source: ObjectReader | None, f: FileEntry, out: Materializer, local: Path | None,
           progress: Progress | None, mode: int) -> tuple[str, list[Problem]]:
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
        with out.create(f.path, mode) as dst:
            found = read_blob(store, f, [dst.write, *taps]) if source is None else _assemble(source, f, [dst.write, *taps])
        if not split(found)[0] or attempt == tries - 1:  # notes (an untrusted file carried) are no failure
            return "fetched", found
        (out.tmp / f.path).unlink()
        if source is not None:
            source.forget()  # what was decoded from the damaged read goes too
    raise AssertionError("unreachable")


def _assemble(source: ObjectReader, f: FileEntry, taps) -> list[Problem]:
    """Stream ``f`` out of its recipe's parts through the checks into ``taps``; the problems."""
    try:
        parts = source.file(f.sha256, f.size)
        pending = memoryview(b"")

        def read(n: int) -> bytes:
            nonlocal pending
            while not pending:
                nxt = next(parts, None)
                if nxt is None:
                    return b""
                pending = memoryview(nxt)
            piece, pending = pending[:n], pending[n:]
            return piece

        return check_stream(read, f, taps=taps)
    except MissingObject as e:
        return [Problem(f.path, Kind.MISSING, "its recipe and objects", str(e))]
    except AptBundleError as e:
        return [Problem(f.path, Kind.BLOB, "a valid recipe and objects", str(e))]

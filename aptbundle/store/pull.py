"""``pull``: bring a run out of a store into ``DEST/NAME``, verified, fetching only what is new.

The guarantees are ``unpack``'s: the ref, the manifest and every blob are hostile until
checked (the ref must be a digest, the manifest must hash to it and pass the manifest rules,
every file is hashed and scanned as it streams), files are created by aptbundle itself inside a
fresh temporary folder beside ``DEST/NAME`` (exclusive create, no links followed, names from
the checked manifest only), and that folder takes ``NAME``'s place only when everything checked
out; on any problem nothing is left behind. With ``--trust`` the manifest's signature is
checked before any blob is fetched.

When ``DEST/NAME`` already holds a version of the run, its files whose hash the new manifest
names are reused (hard-linked, or copied, and hashed again on the way), so only missing files
travel; the old folder is replaced as a whole, under its writer lock (a run being trained is
never pulled over).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from aptbundle.archive.extract import _CREATE, _check_size, make_links
from aptbundle.format import signature
from aptbundle.format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, SIGNATURE_NAME, Manifest, parse_manifest
from aptbundle.format.run import Run, walk_files
from aptbundle.format.stream import file_source
from aptbundle.format.verify import check_stream
from aptbundle.ground import temporaries
from aptbundle.ground.errors import AptBundleError, StoreError, UnsafePathError, VerifyError
from aptbundle.ground.fsutil import Progress, announce_total, fsync_dir
from aptbundle.ground.paths import check_name
from aptbundle.ground.problems import Problem, split
from aptbundle.store.backend import Store
from aptbundle.store.blobs import read_blob
from aptbundle.store.push import manifest_key, ref_key

HEX64 = re.compile(r"[0-9a-f]{64}")


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

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check_run_name(name: str, store: Store) -> str:
    try:
        return check_name(name)
    except UnsafePathError as e:
        raise StoreError(f"{store.url}: {e}") from None


def resolve(store: Store, name: str, digest: str | None = None) -> tuple[str, bytes, Manifest, bytes | None]:
    """``(digest, manifest bytes, manifest, signature)`` of run ``name`` (its newest version, or
    the one with ``digest``), every piece checked against the others."""
    name = check_run_name(name, store)
    if digest is None:
        raw = store.read(ref_key(name), 256)
        if raw is None:
            raise StoreError(f"{store.shown(ref_key(name))}: no such run in the store; `aptbundle ls {store.url}`"
                             " lists what it holds")
        digest = raw.decode("ascii", "replace").strip()
        if not HEX64.fullmatch(digest):
            raise StoreError(f"{store.shown(ref_key(name))}: is not a run digest (64 hex digits); the store is"
                             " damaged or crafted")
    mkey = manifest_key(digest)
    data = store.read(mkey, MAX_MANIFEST_BYTES)
    if data is None:
        raise StoreError(f"{store.shown(mkey)}: the manifest of {name} at {digest[:16]}… is missing from the"
                         " store; push the run again")
    man = parse_manifest(data, store.shown(mkey))
    if man.digest() != digest:
        raise StoreError(f"{store.shown(mkey)}: its digest is {man.digest()}, not the {digest} it is stored"
                         " under; the store is damaged or crafted")
    if man.name != name:
        raise StoreError(f"{store.shown(mkey)}: is the manifest of run {man.name!r}, not {name!r}; the store is"
                         " damaged or crafted")
    return digest, data, man, store.read(mkey + ".sig", signature.MAX_SIGNATURE_BYTES)


def pull(store_url: str | Path, name: str, dest: str | Path = ".", *, digest: str | None = None,
         trust: list[str | Path] | None = None, progress: Progress | None = None,
         max_size: int | None = None, strict: bool = False) -> PullResult:
    """Pull run ``name`` (its newest version, or the one with ``digest``) into ``DEST/NAME``.

    >>> # pull("s3://bucket/runs", "run1", "elsewhere").path
    'elsewhere/run1'
    """
    t0 = time.monotonic()
    keys = [signature.load_public_key(k) for k in trust or []]
    store = Store(store_url)
    if store.local and not Path(store.url).is_dir():
        raise StoreError(f"{store.url}: no such store (folder); check the path, or push a run there first")
    digest, data, man, sig = resolve(store, name, digest)
    signer = signature.check(sig, man.name, digest, keys, f"{store.url}/{man.name}") if keys else None
    dest = Path(dest)
    made = [d for d in [dest, *dest.parents] if not d.exists()]
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / man.name
    try:
        with _old_version(final) as old:
            have = old.manifest.file_map() if old is not None else {}
            by_hash = {f.sha256: f.path for f in have.values()}
            fresh = sum(f.size for f in man.files if f.sha256 not in by_hash)
            _check_size(fresh, dest, max_size, f"{store.url}/{man.name}")
            temporaries.clean_stale(dest, man.name)
            announce_total(progress, man.total_size())
            counts = {"fetched": [0, 0], "reused": [0, 0]}
            with temporaries.temp_dir(dest, man.name) as tmp:
                problems: list[Problem] = []
                for f in man.files:
                    target = tmp / f.path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    kind, found = _place(store, f, target, old.path / by_hash[f.sha256] if f.sha256 in by_hash
                                         else None, progress)
                    problems += split(found, strict)[0]
                    counts[kind][0] += 1
                    counts[kind][1] += f.size
                if problems:
                    raise VerifyError(problems, what=f"{store.url}/{man.name} at {digest[:16]}… (not pulled)")
                _write(tmp / MANIFEST_NAME, data)
                make_links(tmp, man)
                if sig is not None:
                    _write(tmp / SIGNATURE_NAME, sig)
                _swap(tmp, final, old is not None)
        fsync_dir(dest)
    except BaseException:
        for d in made:
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return PullResult(str(final), man.name, digest, len(man.files), *counts["fetched"], *counts["reused"],
                      time.monotonic() - t0, signer.keyid if signer else None)


@contextlib.contextmanager
def _old_version(final: Path):
    """The run already at ``final`` (None if there is none), held under its writer lock."""
    if not (final.exists() or final.is_symlink()):
        yield None
        return
    if final.is_symlink() or not final.is_dir() or not Run.is_run(final):
        raise StoreError(f"{final}: already exists and is not a run; remove it or pull with -C into another folder")
    try:
        run = Run.open(final)
    except AptBundleError as e:
        raise StoreError(f"{final}: already exists but cannot be read as a run ({e}); remove it or pull with -C"
                         " into another folder") from None
    with run.writer():
        listed = run.manifest.file_map()
        files, problems = walk_files(final, run.manifest.links)
        extra = [p for p in files if p not in listed] + [p.path for p in problems]
        if extra:
            raise StoreError(f"{final}: holds files its manifest does not list ({', '.join(extra[:5])}); a pull"
                             " replaces the folder whole, so move them away or pull with -C into another folder")
        yield run


def _place(store: Store, f, target: Path, local: Path | None, progress: Progress | None) -> tuple[str, list[Problem]]:
    """Create ``target`` with the bytes of ``f``: from the old version if it is intact, else the store."""
    taps = [lambda b: progress(len(b))] if progress else []
    if local is not None:
        try:
            os.link(local, target, follow_symlinks=False)
            with open(target, "rb", buffering=0) as src:
                if not split(check_stream(file_source(src), f, taps=taps))[0]:
                    return "reused", []
            target.unlink()
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
    with open(os.open(target, _CREATE, 0o644), "wb") as out:
        return "fetched", read_blob(store, f, [out.write, *taps])


def _write(path: Path, data: bytes) -> None:
    with open(os.open(path, _CREATE, 0o644), "wb") as f:
        f.write(data)


def _swap(tmp: Path, final: Path, replace: bool) -> None:
    """Put the new version at ``final``; an old one goes (after the new one is in place)."""
    if not replace:
        if final.exists():
            raise StoreError(f"{final}: appeared while pulling; nothing was changed")
        os.rename(tmp, final)
        return
    old = temporaries.temp_path(final.parent, final.name + "-old")
    os.rename(final, old)
    os.rename(tmp, final)
    temporaries.remove(old)

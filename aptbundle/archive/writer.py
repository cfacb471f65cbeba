"""Pack a run into one ``NAME.aptrun.tar.zst``, streaming.

The archive is a standard POSIX tar in one zstd frame (``tar --zstd -xf`` opens it): one
top-level folder named after the run, ``NAME/aptrun.json`` first, then the manifest's files in
path order, with normalised modes, owners and times, so the same run always packs to the same
bytes. Each file is read once: the same blocks are hashed, scanned (``verify.check_stream``)
and fed to a multi-threaded zstd writer; a file that no longer matches the manifest, or that
would run code when loaded, is refused and the half-written archive discarded.

A trainer may be committing while a pack runs: under the run's commit lock (shared) the pack
takes a consistent view, hard links of the listed files in a private folder of the run, and
then reads those, so commits are held up only for the moment the links take. Where hard links
are not possible, the lock is held for the whole pack. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from aptbundle.archive.codec import Grouping, archive_records, dense_width, member_records
from aptbundle.archive.storage import CHUNK, archive_name, is_remote, remote_fs
from aptbundle.archive.tarstream import end_of_archive, member_header, padding
from aptbundle.format import signature
from aptbundle.format.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest
from aptbundle.format.run import Run
from aptbundle.format.stream import file_source
from aptbundle.format.verify import check_stream, verify_run
from aptbundle.ground import temporaries
from aptbundle.ground.errors import AptBundleError, ArchiveError, VerifyError
from aptbundle.ground.fsutil import Progress, announce_total, fsync_dir
from aptbundle.ground.problems import Problem, split


def _mtime(man: Manifest) -> int:
    try:
        t = _dt.datetime.fromisoformat(man.updated_at.replace("Z", "+00:00"))
        return max(0, int(t.timestamp()))
    except (ValueError, OverflowError):
        return 0


def select_checkpoints(man: Manifest, which: str = "all") -> Manifest:
    """A copy of the manifest that keeps all checkpoints, or only ``latest`` or ``best``."""
    if which == "all":
        return Manifest(**{**man.__dict__, "files": list(man.files), "checkpoints": list(man.checkpoints)})
    name = man.latest if which == "latest" else (man.best.name if man.best else None)
    if name is None:
        raise ArchiveError(f"run {man.name}: has no {which} checkpoint; pack with --checkpoints all")
    drop = {f.path for c in man.checkpoints if c.name != name for f in man.files_of(c)}
    files = [f for f in man.files if f.path not in drop]
    links = [x for x in man.links if x.resolved() not in drop]
    ckpts = [c for c in man.checkpoints if c.name == name]
    best = man.best if man.best and man.best.name == name else None
    untrusted = [u for u in man.untrusted if u not in drop]
    extra = dict(man.extra)
    if isinstance(extra.get("machine_paths"), dict):
        extra["machine_paths"] = {k: v for k, v in extra["machine_paths"].items() if k not in drop}
    return Manifest(**{**man.__dict__, "files": files, "checkpoints": ckpts, "latest": name, "best": best,
                       "links": links, "untrusted": untrusted, "extra": extra})


@dataclass
class PackResult:
    """What ``pack`` wrote."""

    path: Path | str
    size: int
    digest: str
    files: int
    data_size: int


def pack(run_dir: str | Path, out: str | Path | None = None, *, level: int | None = None, threads: int = 0,
         checkpoints: str = "all", progress: Progress | None = None, dense: bool = False,
         force: bool = False, sign: str | Path | None = None) -> PackResult:
    """Pack a run into a verified, deterministic ``.aptrun.tar.zst``.

    ``threads=0`` uses every core. ``dense=True`` byte-groups float tensors (see ``codec``): a
    smaller archive that only aptbundle can unpack. ``level`` defaults to 3, and to 1 with
    ``dense`` (byte-grouped floats compress as well at level 1 and twice as fast). An existing
    file at the output path is replaced only with ``force``. ``sign`` is a private key file
    (``aptbundle keygen``): the archive then carries ``NAME/aptrun.sig`` after the manifest. A
    run unpacked from a signed archive keeps its signature, which a pack of the same state
    carries on.

    >>> # pack("outputs/run1").path
    PosixPath('run1.aptrun.tar.zst')
    """
    if checkpoints not in ("all", "latest", "best"):
        raise ArchiveError(f"--checkpoints {checkpoints!r}: expected all, latest or best")
    level = level if level is not None else (1 if dense else 3)
    if not 1 <= level <= 22:
        raise ArchiveError(f"--level {level}: expected a zstd level from 1 to 22")
    threads = threads if threads > 0 else (os.cpu_count() or 1)
    run = Run.open(run_dir)
    if sign is not None:
        signature.load_private_key(sign)  # a bad key is refused before any work
    target = _target(run, out)
    _refuse_existing(target, force)
    temporaries.clean_stale(run.path, "pack")
    snap = None
    try:
        with contextlib.ExitStack() as held:
            held.enter_context(run.reading())
            run.reload()
            man = select_checkpoints(run.manifest, checkpoints)
            only = None if checkpoints == "all" else [f.path for f in man.files]
            if not verify_run(run, only=only, quick=True).ok:  # name every problem, not just the cheap ones
                refuse(run, verify_run(run, only=only).problems, "packed")
            announce_total(progress, man.total_size())
            sig = signature.sign(man.name, man.digest(), sign) if sign is not None else \
                carried_signature(run, man)
            snap = _snapshot(run.path, man)
            if snap is None:  # no hard links here: keep commits out while the files are read in place
                return _write_to(target, run.path, man, level, threads, progress, dense, sig)
        return _write_to(target, snap, man, level, threads, progress, dense, sig)
    finally:
        if snap is not None:
            temporaries.remove(snap)


def refuse(run: Run, problems: list[Problem], verb: str) -> None:
    """Raise for a run that does not match its manifest; when it only gained or lost files (a
    folder a framework keeps writing), say so and name the command that takes them in."""
    if problems and all(p.kind in ("extra", "missing") for p in problems):
        def few(kind: str, what: str) -> str:
            paths = [p.path for p in problems if p.kind == kind]
            return f"{len(paths)} {what} ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''})" if paths else ""

        what = "; ".join(x for x in (few("extra", "new file(s) the manifest does not list"),
                                     few("missing", "listed file(s) gone")) if x)
        raise ArchiveError(f"{run.path}: {what}; nothing was {verb}. Take the changes in with `aptbundle init --update"
                           f" {run.path}` (or list what should not travel in {run.path}/.aptignore)")
    hint = None
    if not run.manifest.trainer and all(p.kind in ("extra", "missing", "size", "hash") for p in problems):
        hint = (f"the folder changed since its manifest was written; if its framework is still writing it, take the"
                f" changes in with `aptbundle init --update {run.path}`")
    raise VerifyError(problems, what=f"run {run.name} (not {verb})", hint=hint)


def carried_signature(run: Run, man: Manifest) -> bytes | None:
    """The run's own ``aptrun.sig`` when it signs exactly ``man`` (else None: it would not verify)."""
    data = run.signature()
    try:
        env = signature.parse_envelope(data, SIGNATURE_NAME) if data is not None else None
    except AptBundleError:
        return None
    return data if env is not None and env.digest == man.digest() and env.name == man.name else None


def plan(run_dir: str | Path, out: str | Path | None = None, *, checkpoints: str = "all") -> dict:
    """What ``pack`` would write, without writing anything: the archive's name, files and size."""
    run = Run.open(run_dir)
    with run.reading():
        run.reload()
        man = select_checkpoints(run.manifest, checkpoints)
    target = _target(run, out, clean=False)
    return {"archive": str(target), "name": man.name, "digest": man.digest(), "data_size": man.total_size(),
            "files": [{"path": f.path, "size": f.size} for f in man.files],
            "checkpoints": [c.name for c in man.checkpoints]}


def _target(run: Run, out: str | Path | None, clean: bool = True) -> Path | str:
    if out is not None and is_remote(out):
        return str(out) + (archive_name(run.name) if str(out).endswith("/") else "")
    target = Path(out) if out is not None else Path(archive_name(run.name))
    if target.is_dir():
        target = target / archive_name(run.name)
    if not target.parent.is_dir():
        raise ArchiveError(f"{target}: the folder {target.parent} does not exist; create it or choose another -o")
    if clean:
        temporaries.clean_stale(target.parent, target.name)
    return target


def _refuse_existing(target: Path | str, force: bool) -> None:
    """Never overwrite a file the user did not ask to replace (``-o notes.txt`` by mistake)."""
    if force:
        return
    if isinstance(target, str):
        fs, rpath = remote_fs(target)
        exists = fs.exists(rpath)
    else:
        exists = target.exists() or target.is_symlink()
    if exists:
        raise ArchiveError(f"{target}: already exists; pass --force to replace it, or choose another -o")


def _write_to(target: Path | str, root: Path, man: Manifest, level: int, threads: int,
              progress: Progress | None, dense: bool, sig: bytes | None = None) -> PackResult:
    """Write the archive to ``target``: locally a temporary name renamed at the end, remotely a
    multipart upload the store makes visible only when it completes (discarded on failure)."""
    if isinstance(target, str):
        fs, rpath = remote_fs(target)
        sink, tmp = fs.open(rpath, "wb", block_size=16 << 20), None
    else:
        tmp = temporaries.temp_path(target.parent, target.name)
        sink = open(tmp, "xb")
    try:
        size = _write_archive(root, man, sink, level, threads, progress, dense, sig=sig)
        sink.close()
    except BaseException:
        _discard(sink, tmp)
        raise
    if tmp is not None:
        os.replace(tmp, target)
        fsync_dir(target.parent)
    return PackResult(target, size, man.digest(), len(man.files), man.total_size())


def _discard(sink, tmp: Path | None) -> None:
    """Throw away a half-written archive: the local temporary, or the pending upload."""
    with contextlib.suppress(Exception):
        sink.discard() if hasattr(sink, "discard") else sink.close()
    if tmp is not None:
        tmp.unlink(missing_ok=True)


def _snapshot(root: Path, man: Manifest) -> Path | None:
    """Hard-link the listed files into a private folder inside the run (None where links fail).

    Writers never change a file in place (they write a new one and rename it), so the links keep
    exactly the bytes the manifest describes even if a trainer commits or retires checkpoints
    once the lock is released.
    """
    snap = temporaries.temp_path(root, "pack")
    try:
        snap.mkdir()
        for f in man.files:
            dst = snap / f.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(root / f.path, dst, follow_symlinks=False)
    except OSError:
        temporaries.remove(snap)
        return None
    return snap


def _mode(path: Path) -> int:
    """The mode an archive records: private (0600) and executable (0755/0700) files keep that,
    everything else is 0644, so the umask of the machine that packs never changes the bytes."""
    m = os.stat(path).st_mode
    private, exe = not m & 0o077, bool(m & 0o100)
    return (0o700 if exe else 0o600) if private else (0o755 if exe else 0o644)


def _write_archive(root: Path, man: Manifest, raw: BinaryIO, level: int, threads: int,
                   progress: Progress | None, dense: bool = False, scan: bool = True,
                   sig: bytes | None = None) -> int:
    """Stream the archive of ``man``'s files under ``root`` into ``raw``; return its size.

    ``scan=False`` packs files the content scan would refuse (only tests build such archives).
    """
    mtime, name = _mtime(man), man.name
    widths = {f.path: w for f in man.files if (w := dense_width(root / f.path, f.path, f.size))} if dense else {}
    problems: list[Problem] = []
    cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    with cctx.stream_writer(raw, closefd=False, write_size=CHUNK) as z:
        written = 0

        def put(b) -> None:
            nonlocal written
            z.write(b)
            written += len(b)

        mbytes = man.to_bytes()
        put(member_header(f"{name}/{MANIFEST_NAME}", len(mbytes), mtime=mtime, extra_pax=archive_records(bool(widths))))
        put(mbytes + padding(len(mbytes)))
        if sig is not None:
            put(member_header(f"{name}/{SIGNATURE_NAME}", len(sig), mtime=mtime))
            put(sig + padding(len(sig)))
        for f in man.files:
            width = widths.get(f.path)
            put(member_header(f"{name}/{f.path}", f.size, mtime=mtime, extra_pax=member_records(width),
                              mode=_mode(root / f.path)))
            grouping = Grouping(width, put) if width else None
            taps = [grouping or put] + ([lambda b: progress(len(b))] if progress else [])
            with open(root / f.path, "rb", buffering=0) as src:
                problems += check_stream(file_source(src), f, scan=scan, taps=taps)
            if grouping:
                grouping.flush()
            put(padding(f.size))
        problems, _notes = split(problems)  # untrusted files travel, marked in the manifest
        if problems:
            raise VerifyError(problems, what=f"run {man.name} (not packed)")
        put(end_of_archive(written))
    # no fsync: like tar and zstd, the archive is left to the page cache (a kill cannot tear
    # it: it is renamed into place only once complete; `verify` proves it after a power cut)
    raw.flush()
    return raw.tell()

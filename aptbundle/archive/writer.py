"""Pack a run into one ``NAME.aptrun.tar.zst``, streaming.

The archive is a standard POSIX tar in one zstd frame (``tar --zstd -xf`` opens it): one
top-level folder named after the run, ``NAME/aptrun.json`` first, then the manifest's files in
path order, with normalised modes, owners and times, so the same run always packs to the same
bytes. Each file is read once: the same blocks are hashed, scanned (``verify.check_stream``)
and fed to a multi-threaded zstd writer; a file that no longer matches the manifest, or that
would run code when loaded, is refused and the half-written archive discarded.

A trainer may be committing while a pack runs: the pack reads the run through the read view
(``transfer.view``), so commits are held up only for the moment its hard links take. Nothing
here imports torch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from aptbundle.archive.storage import archive_name
from aptbundle.archive.tarstream import end_of_archive, member_header, padding
from aptbundle.format.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest
from aptbundle.format.run import Run
from aptbundle.format.stream import file_source
from aptbundle.format.verify import check_stream
from aptbundle.ground import temporaries
from aptbundle.ground.errors import ArchiveError, VerifyError
from aptbundle.ground.fsutil import BLOCK, Progress, announce_total, fsync_dir
from aptbundle.ground.problems import Problem, split
from aptbundle.transfer.codec import Encoding, Grouping, archive_records, dense_width, member_records
from aptbundle.transfer.remote import is_remote, remote_fs
from aptbundle.transfer.view import ReadView, file_mode, read_view


def _mtime(man: Manifest) -> int:
    try:
        t = _dt.datetime.fromisoformat(man.updated_at.replace("Z", "+00:00"))
        return max(0, int(t.timestamp()))
    except (ValueError, OverflowError):
        return 0


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
    ``dense``. An existing file at the output path is replaced only with ``force``. ``sign`` is a
    private key file (``aptbundle keygen``): the archive then carries ``NAME/aptrun.sig`` after
    the manifest. A run unpacked from a signed archive keeps its signature, which a pack of the
    same state carries on. The output defaults to ``NAME.aptrun.tar.zst`` in the current folder.
    """
    enc = Encoding.choose(level, threads, dense)
    target = _target(Run.open(run_dir), out)
    _refuse_existing(target, force)
    with read_view(run_dir, checkpoints=checkpoints, sign=sign, verb="packed") as view:
        announce_total(progress, view.manifest.total_size())
        return _write_to(target, view, enc, progress)


def plan(run_dir: str | Path, out: str | Path | None = None, *, checkpoints: str = "all") -> dict:
    """What ``pack`` would write, without writing anything: the archive's name, files and size."""
    run = Run.open(run_dir)
    with run.reading():
        run.reload()
        man = run.manifest.select(checkpoints)
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


def _write_to(target: Path | str, view: ReadView, enc: Encoding, progress: Progress | None) -> PackResult:
    """Write the archive to ``target``: locally a temporary name renamed at the end, remotely a
    multipart upload the store makes visible only when it completes (discarded on failure)."""
    if isinstance(target, str):
        fs, rpath = remote_fs(target)
        sink, tmp = fs.open(rpath, "wb", block_size=16 << 20), None
    else:
        tmp = temporaries.temp_path(target.parent, target.name)
        sink = open(tmp, "xb")
    try:
        size = write_archive(view.root, view.manifest, sink, enc, progress, sig=view.signature)
        sink.close()
    except BaseException:
        _discard(sink, tmp)
        raise
    if tmp is not None:
        os.replace(tmp, target)
        fsync_dir(target.parent)
    man = view.manifest
    return PackResult(target, size, man.digest(), len(man.files), man.total_size())


def _discard(sink, tmp: Path | None) -> None:
    """Throw away a half-written archive: the local temporary, or the pending upload."""
    with contextlib.suppress(Exception):
        getattr(sink, "discard", sink.close)()
    if tmp is not None:
        tmp.unlink(missing_ok=True)


def write_archive(root: Path, man: Manifest, raw: BinaryIO, enc: Encoding, progress: Progress | None = None, *,
                  scan: bool = True, sig: bytes | None = None) -> int:
    """Stream the archive of ``man``'s files under ``root`` into ``raw``; return its size.

    ``scan=False`` packs files the content scan would refuse: an archive only a test of the
    unpacker's own checks needs (nothing else calls it so).
    """
    mtime, name = _mtime(man), man.name
    widths = {f.path: w for f in man.files if (w := dense_width(root / f.path, f.path, f.size))} if enc.dense else {}
    problems: list[Problem] = []
    cctx = zstandard.ZstdCompressor(level=enc.level, threads=enc.threads, write_checksum=True)
    with cctx.stream_writer(raw, closefd=False, write_size=BLOCK) as z:
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
                              mode=file_mode(root / f.path)))
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

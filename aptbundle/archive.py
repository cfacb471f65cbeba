"""Pack a run into one ``NAME.aptrun.tar.zst``, streaming (reading it back: ``extract``).

The archive is a standard POSIX tar in one zstd frame (``tar --zstd -xf`` opens it): one
top-level folder named after the run, ``NAME/aptrun.json`` first, then the manifest's files in
path order, with normalised modes, owners and times, so the same run always packs to the same
bytes. Packing reads each file once, feeding the same block to SHA-256 and to a multi-threaded
zstd writer, and refuses a file that no longer matches the manifest. ``unpack``,
``verify_archive`` and ``read_archive_manifest`` live in ``extract`` and are re-exported here.
Nothing here imports torch.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from aptbundle.errors import ArchiveError, ManifestError, VerifyError
from aptbundle.fsutil import TMP_PREFIX, Progress, announce_total, fsync_dir
from aptbundle.manifest import MANIFEST_NAME, Manifest, load_manifest
from aptbundle.run import Problem, Run, walk_files
from aptbundle.scan import unsafe_problems
from aptbundle.storage import CHUNK, SUFFIX, archive_name, clean_stale, is_remote, remote_fs, temp_for
from aptbundle.tarstream import end_of_archive, member_header, padding

__all__ = ["SUFFIX", "PackResult", "archive_name", "pack", "read_archive_manifest", "select_checkpoints",
           "unpack", "verify_archive"]


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
    drop = tuple(c.folder + "/" for c in man.checkpoints if c.name != name)
    files = [f for f in man.files if not f.path.startswith(drop)]
    ckpts = [c for c in man.checkpoints if c.name == name]
    best = man.best if man.best and man.best.name == name else None
    return Manifest(**{**man.__dict__, "files": files, "checkpoints": ckpts, "latest": name, "best": best})


@dataclass
class PackResult:
    """What ``pack`` wrote."""

    path: Path
    size: int
    digest: str
    files: int
    data_size: int


class _Changed(Exception):
    """A file changed while it was packed (a trainer is writing the run)."""


def pack(run_dir: str | Path, out: str | Path | None = None, *, level: int | None = None, threads: int = 0,
         checkpoints: str = "all", progress: Progress | None = None, attempts: int = 10,
         dense: bool = False) -> PackResult:
    """Pack a run into a verified, deterministic ``.aptrun.tar.zst``.

    ``threads=0`` uses every core. ``dense=True`` byte-groups float tensors (see ``codec``): a
    smaller archive that only aptbundle can unpack. ``level`` defaults to 3, and to 1 with
    ``dense`` (byte-grouped floats compress as well at level 1 and twice as fast). If a trainer
    commits a new checkpoint while packing, the pack starts again from the new manifest (up to
    ``attempts`` times), so the archive always holds one consistent state of the run.

    >>> # pack("outputs/run1").path
    PosixPath('run1.aptrun.tar.zst')
    """
    if checkpoints not in ("all", "latest", "best"):
        raise ArchiveError(f"--checkpoints {checkpoints!r}: expected all, latest or best")
    if level is None:
        level = 1 if dense else 3
    if not 1 <= level <= 22:
        raise ArchiveError(f"--level {level}: expected a zstd level from 1 to 22")
    run = Run.open(run_dir)
    remote = out is not None and is_remote(out)
    if remote:
        url = str(out) + (archive_name(run.name) if str(out).endswith("/") else "")
        fs, rpath = remote_fs(url)
        target = url
    else:
        target = Path(out) if out is not None else Path(archive_name(run.name))
        if target.is_dir():
            target = target / archive_name(run.name)
        if not target.parent.is_dir():
            raise ArchiveError(f"{target}: the folder {target.parent} does not exist; create it or choose another -o")
        clean_stale(target.parent, target.name)
    clean_stale(run.path, "pack")
    threads = threads if threads > 0 else (os.cpu_count() or 1)
    announce_total(progress, select_checkpoints(run.manifest, checkpoints).total_size())
    for attempt in range(attempts):
        raw_man = run.manifest if attempt == 0 else load_manifest(run.path)
        man = select_checkpoints(raw_man, checkpoints)

        def may_retry() -> bool:
            # a trainer in the middle of a commit (checkpoint renamed in, manifest not yet
            # written) looks inconsistent for a moment: wait for the commit and start again
            if attempt + 1 < attempts and (run.writer_active() or _manifest_changed(run.path, raw_man)):
                time.sleep(min(0.5, 0.1 * (attempt + 1)))
                return True
            return False

        problems = _precheck(run.path, man, full=checkpoints == "all")
        if problems:
            if may_retry():
                continue
            # name every problem, not just the cheap ones: rehash what is there
            full = Run(run.path, man).verify(only=None if checkpoints == "all" else [f.path for f in man.files])
            seen = {(p.path, p.kind) for p in full}
            problems = sorted(full + [p for p in problems if (p.path, p.kind) not in seen and p.kind == "unsafe"],
                              key=lambda p: p.path)
            raise VerifyError(problems, what=f"run {run.name} (not packed)")
        snap = None
        # locally a temporary name renamed at the end; remotely a multipart upload, which the
        # object store makes visible only when it completes (and which is discarded on failure)
        tmp = None if remote else temp_for(target)
        sink = fs.open(rpath, "wb", block_size=16 << 20) if remote else open(tmp, "xb")
        try:
            snap = _snapshot(run.path, man)
            size = _write_archive(snap or run.path, man, sink, level, threads, progress, dense)
            sink.close()
        except BaseException as e:
            _discard(sink, tmp)
            # FileNotFoundError: a checkpoint was retired between manifest and snapshot
            if isinstance(e, (FileNotFoundError, _Changed)) and may_retry():
                continue
            if isinstance(e, _Changed):
                raise VerifyError(e.args[0], what=f"run {run.name} (not packed)") from None
            raise
        finally:
            if snap is not None:
                shutil.rmtree(snap, ignore_errors=True)
        if not remote:
            os.replace(tmp, target)
            fsync_dir(target.parent)
        return PackResult(target, size, man.digest(), len(man.files), man.total_size())
    raise ArchiveError(f"run {run.name}: kept changing while it was packed; try again when training pauses")


def _discard(sink, tmp: Path | None) -> None:
    """Throw away a half-written archive: the local temporary, or the pending upload."""
    try:
        if hasattr(sink, "discard"):
            sink.discard()
        else:
            sink.close()
    except Exception:
        pass
    if tmp is not None:
        tmp.unlink(missing_ok=True)


def _snapshot(root: Path, man: Manifest) -> Path | None:
    """Hard-link the listed files into a private folder inside the run.

    Writers never change a file in place (they write a new one and rename it), so the links keep
    exactly the bytes the manifest describes even if a trainer commits or retires checkpoints
    while the pack runs. Returns None where hard links are not available (then files are read in
    place, and a change is caught by the hash check and retried).
    """
    snap = root / f"{TMP_PREFIX}pack-{os.getpid()}-{os.urandom(3).hex()}"
    try:
        snap.mkdir()
        for f in man.files:
            dst = snap / f.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(root / f.path, dst, follow_symlinks=False)
    except FileNotFoundError:
        shutil.rmtree(snap, ignore_errors=True)
        raise
    except OSError:
        shutil.rmtree(snap, ignore_errors=True)
        return None
    return snap


def _manifest_changed(root: Path, man: Manifest) -> bool:
    try:
        return load_manifest(root).digest() != man.digest()
    except ManifestError:
        return True


def _precheck(root: Path, man: Manifest, full: bool) -> list[Problem]:
    """Cheap checks before any byte is packed: listed files present with their sizes, no extras,
    no pickle that would run code."""
    problems: list[Problem] = []
    if full:
        on_disk, problems = walk_files(root)
        listed = man.file_map()
        problems += [Problem(p, "extra", "no such file (not in the manifest)", "a file on disk")
                     for p in on_disk if p not in listed]
    for f in man.files:
        try:
            st = os.lstat(root / f.path)
        except OSError:
            problems.append(Problem(f.path, "missing", f"{f.size} bytes", "no such file"))
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(Problem(f.path, "type", "a regular file", "a link or special file"))
        elif st.st_size != f.size:
            problems.append(Problem(f.path, "size", f"{f.size} bytes", f"{st.st_size} bytes"))
    bad = {p.path for p in problems}
    return problems + unsafe_problems(root, [f.path for f in man.files if f.path not in bad])


def _write_archive(root: Path, man: Manifest, raw: BinaryIO, level: int, threads: int,
                   progress: Progress | None, dense: bool = False) -> int:
    """Stream the archive of ``man``'s files under ``root`` into ``raw``; return its size."""
    mtime = _mtime(man)
    name = man.name
    widths = {}
    if dense:
        from aptbundle.codec import BLOCK as DENSE_BLOCK
        from aptbundle.codec import PAX_REQUIRES, PAX_WIDTH, dense_width, group

        widths = {f.path: w for f in man.files if (w := dense_width(root / f.path, f.path, f.size))}
    buf = bytearray(DENSE_BLOCK if widths else CHUNK)
    view = memoryview(buf)
    problems: list[Problem] = []
    cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    with cctx.stream_writer(raw, closefd=False, write_size=CHUNK) as z:
        mbytes = man.to_bytes()
        written = 0

        def put(b: bytes) -> None:
            nonlocal written
            z.write(b)
            written += len(b)

        requires = {PAX_REQUIRES: "dense"} if widths else None
        put(member_header(f"{name}/{MANIFEST_NAME}", len(mbytes), mtime=mtime, extra_pax=requires))
        put(mbytes + padding(len(mbytes)))
        for f in man.files:
            width = widths.get(f.path)
            put(member_header(f"{name}/{f.path}", f.size, mtime=mtime,
                              extra_pax={PAX_WIDTH: str(width)} if width else None))
            h = hashlib.sha256()
            left = f.size
            step = DENSE_BLOCK if width else CHUNK
            with open(root / f.path, "rb") as src:
                while left:
                    n = src.readinto(view[:min(step, left)])
                    if not n:
                        raise _Changed([Problem(f.path, "size", f"{f.size} bytes", "fewer (file shrank while packing)")])
                    chunk = view[:n]
                    h.update(chunk)
                    z.write(group(chunk, width) if width else chunk)
                    left -= n
                    if progress:
                        progress(n)
                grew = src.read(1)
            written += f.size
            put(padding(f.size))
            if grew:
                problems.append(Problem(f.path, "size", f"{f.size} bytes", "more (file grew while packing)"))
            elif h.hexdigest() != f.sha256:
                problems.append(Problem(f.path, "hash", f"sha256 {f.sha256[:16]}…", f"sha256 {h.hexdigest()[:16]}…"))
        if problems:
            raise _Changed(problems)
        put(end_of_archive(written))
    # no fsync: like tar and zstd, the archive is left to the page cache (a kill cannot tear
    # it: it is renamed into place only once complete; `verify` proves it after a power cut)
    raw.flush()
    return raw.tell()



from aptbundle.extract import read_archive_manifest, unpack, verify_archive  # noqa: E402  (re-exported)

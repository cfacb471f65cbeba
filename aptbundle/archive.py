"""Pack a run into one ``NAME.aptrun.tar.zst`` and unpack, verify or inspect it, streaming.

The archive is a standard POSIX tar in one zstd frame (``tar --zstd -xf`` opens it): one
top-level folder named after the run, ``NAME/aptrun.json`` first, then the manifest's files in
path order, with normalised modes, owners and times, so the same run always packs to the same
bytes. Packing reads each file once, feeding the same block to SHA-256 and to a multi-threaded
zstd writer, and refuses a file that no longer matches the manifest. Unpacking never uses
``extractall``: it reads the manifest first, then creates each listed file itself in a fresh
temporary folder, hashing as it writes, and renames the folder into place only when every byte
checked out. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import zstandard

from aptbundle.errors import ArchiveError, ManifestError, UnsafeContentError, UnsafePathError, VerifyError
from aptbundle.fsutil import TMP_PREFIX, Progress, fsync_dir, pid_alive
from aptbundle.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, load_manifest, parse_manifest
from aptbundle.paths import check_name, collision_key, normalize_relpath
from aptbundle.run import CHECKPOINTS, Problem, Run, walk_files
from aptbundle.scan import needs_scan, scan_file
from aptbundle.tarstream import BLOCK as TAR_BLOCK
from aptbundle.tarstream import RECORD, FrameGuard, TarReader, end_of_archive, member_header, padding

SUFFIX = ".aptrun.tar.zst"
CHUNK = 1 << 20


def is_remote(path: str | Path) -> bool:
    """True for a URL such as ``s3://bucket/run1.aptrun.tar.zst`` (read and written via fsspec)."""
    return "://" in str(path)


def _remote_fs(url: str):
    try:
        import fsspec

        return fsspec.url_to_fs(url)
    except ImportError as e:
        raise ArchiveError(f"{url}: remote archives need fsspec and the backend for this URL ({e.name or e});"
                           " install them with `pip install aptbundle[s3]`") from None
    except ValueError as e:
        raise ArchiveError(f"{url}: not a usable URL ({e})") from None


def archive_name(run_name: str) -> str:
    """``run1`` -> ``run1.aptrun.tar.zst``."""
    return run_name + SUFFIX


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
    keep_prefix = f"{CHECKPOINTS}/{name}/"
    files = [f for f in man.files if not f.path.startswith(CHECKPOINTS + "/") or f.path.startswith(keep_prefix)]
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


def clean_stale(parent: Path, stem: str) -> None:
    """Remove temporaries ``.aptrun-tmp-STEM-PID-*`` left in ``parent`` by processes now dead."""
    prefix = f"{TMP_PREFIX}{stem}-"
    with contextlib.suppress(OSError):
        for p in parent.iterdir():
            if p.name.startswith(prefix):
                pid = p.name[len(prefix):].split("-", 1)[0]
                if pid.isdigit() and not pid_alive(int(pid)):
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _temp_for(target: Path) -> Path:
    return target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}-{os.urandom(3).hex()}"


class _Changed(Exception):
    """A file changed while it was packed (a trainer is writing the run)."""


def pack(run_dir: str | Path, out: str | Path | None = None, *, level: int | None = None, threads: int = 0,
         checkpoints: str = "all", progress: Progress | None = None, attempts: int = 5,
         dense: bool = False) -> PackResult:
    """Pack a run into a verified, deterministic ``.aptrun.tar.zst``.

    ``threads=0`` uses every core. ``dense=True`` byte-groups float tensors (see ``codec``): a
    smaller archive that only aptbundle can unpack. ``level`` defaults to 3, and to 1 with
    ``dense`` (byte-grouped floats compress as well at level 1 and twice as fast). If a trainer commits a new checkpoint while packing, the pack
    starts again from the new manifest (up to ``attempts`` times), so the archive always holds
    one consistent state of the run.

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
        fs, rpath = _remote_fs(url)
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
    for attempt in range(attempts):
        raw_man = run.manifest if attempt == 0 else load_manifest(run.path)
        man = select_checkpoints(raw_man, checkpoints)
        problems = _precheck(run.path, man, full=checkpoints == "all")
        if problems:
            # a trainer between renaming a checkpoint into place and committing the manifest
            # looks like an extra folder for a moment: wait for the commit and start again
            committing = all(p.kind == "extra" and p.path.startswith(CHECKPOINTS + "/") for p in problems)
            if attempt + 1 < attempts and (committing or _manifest_changed(run.path, raw_man)):
                time.sleep(0.2 * (attempt + 1))
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
        tmp = None if remote else _temp_for(target)
        sink = fs.open(rpath, "wb", block_size=16 << 20) if remote else open(tmp, "xb")
        try:
            snap = _snapshot(run.path, man)
            size = _write_archive(snap or run.path, man, sink, level, threads, progress, dense)
            sink.close()
        except BaseException as e:
            _discard(sink, tmp)
            retry = attempt + 1 < attempts
            if isinstance(e, FileNotFoundError) and retry:  # a checkpoint was retired meanwhile
                continue
            if isinstance(e, _Changed):
                if _manifest_changed(run.path, raw_man) and retry:
                    continue
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
        elif needs_scan(f.path):
            try:
                scan_file(root / f.path, f.path)
            except UnsafeContentError as e:
                problems.append(Problem(f.path, "unsafe", "only tensors and plain data", str(e)))
    return problems


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


# -- reading ---------------------------------------------------------------------------------
class _Decoder:
    """Decompressed bytes of one zstd frame, with a hard cap on how many may come out."""

    def __init__(self, raw: BinaryIO, shown: str):
        self.shown = shown
        self.guard = FrameGuard(raw, shown)
        self.reader = zstandard.ZstdDecompressor().stream_reader(
            self.guard, read_size=CHUNK, read_across_frames=False, closefd=False)
        self.total = 0
        self.cap = MAX_MANIFEST_BYTES + 4 * 65536 + 16 * TAR_BLOCK
        self.requires: str | None = None  # "dense" when members need aptbundle's codec

    def _raw_read(self, n: int) -> bytes:
        try:
            return self.reader.read(n)
        except zstandard.ZstdError as e:
            raise ArchiveError(f"{self.shown}: corrupt zstd data ({e}); the archive is damaged") from None

    def read_some(self, n: int) -> bytes:
        if self.total + n > self.cap:
            raise ArchiveError(f"{self.shown}: decompresses to more than the manifest declares"
                               f" ({self.cap} bytes); refusing it as a decompression bomb")
        b = self._raw_read(n)
        if not b:
            raise ArchiveError(f"{self.shown}: the tar stream ends early; the archive is truncated")
        self.total += len(b)
        return b

    def read_exact(self, n: int) -> bytes:
        first = self.read_some(n)
        if len(first) == n:
            return first
        parts = [first]
        got = len(first)
        while got < n:
            b = self.read_some(n - got)
            parts.append(b)
            got += len(b)
        return b"".join(parts)

    def finish(self) -> None:
        """After the tar end marker: only zero padding, then the frame's end, then the file's."""
        slack = 0
        while True:
            b = self._raw_read(CHUNK)
            if not b:
                break
            slack += len(b)
            if slack > RECORD or b.count(0) != len(b):
                raise ArchiveError(f"{self.shown}: data after the tar end-of-archive marker; expected nothing")
        self.guard.finish()


def _open_source(path: str | Path) -> tuple[BinaryIO, str, int]:
    """The archive opened for streaming (a local file or a remote object), its name, its size."""
    if is_remote(path):
        fs, rpath = _remote_fs(str(path))
        try:
            size = fs.size(rpath)
            return fs.open(rpath, "rb", block_size=8 << 20, cache_type="readahead"), str(path).rsplit("/", 1)[-1], size
        except FileNotFoundError:
            raise ArchiveError(f"{path}: no such remote archive; check the URL") from None
    p = Path(path)
    if p.is_dir():
        raise ArchiveError(f"{path}: is a folder; expected a {SUFFIX} file")
    try:
        f = open(p, "rb")
    except FileNotFoundError:
        raise ArchiveError(f"{path}: no such archive; check the path") from None
    return f, p.name, os.fstat(f.fileno()).st_size


def _read_manifest(tr: TarReader, dec: _Decoder, shown: str) -> tuple[str, Manifest, bytes]:
    m = tr.next()
    if m is None:
        raise ArchiveError(f"{shown}: empty archive; expected NAME/{MANIFEST_NAME} as its first member")
    parts = m.name.split("/")
    if m.kind != "file" or len(parts) != 2 or parts[1] != MANIFEST_NAME:
        raise ArchiveError(f"{shown}: first member is {m.name!r}; expected NAME/{MANIFEST_NAME} first"
                           " (the manifest is missing or late: not an aptbundle archive)")
    try:
        name = check_name(parts[0])
    except UnsafePathError as e:
        raise ArchiveError(f"{shown}: {e}") from None
    if m.size > MAX_MANIFEST_BYTES:
        raise ArchiveError(f"{shown}: manifest is {m.size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
    unknown = sorted(k for k in m.pax if k.startswith("APTBUNDLE.") and k != "APTBUNDLE.requires")
    if unknown or m.pax.get("APTBUNDLE.requires", "dense") != "dense":
        raise ArchiveError(f"{shown}: needs archive features this aptbundle does not know"
                           f" ({unknown or m.pax['APTBUNDLE.requires']}); upgrade aptbundle")
    sink = io.BytesIO()
    tr.consume(sink, hashlib.sha256(), m.size, CHUNK)
    data = sink.getvalue()
    man = parse_manifest(data, f"{shown}:{m.name}")
    if "APTBUNDLE.requires" in m.pax:
        dec.requires = m.pax["APTBUNDLE.requires"]
    if man.name != name:
        raise ArchiveError(f"{shown}: folder {name!r} holds the manifest of run {man.name!r}; expected them equal")
    overhead = 8 * 1024
    dirs = {f.path.rsplit("/", 1)[0] for f in man.files if "/" in f.path}
    dec.cap = tr.offset + sum(f.size + overhead for f in man.files) + overhead * (len(dirs) + 1) + 2 * RECORD
    return name, man, data


def read_archive_manifest(path: str | Path, *, with_requires: bool = False):
    """The manifest of an archive, reading only its first member; and the archive's size.

    With ``with_requires`` also what the archive needs beyond plain tar (None, or "dense").
    """
    raw, shown, size = _open_source(path)
    with raw:
        dec = _Decoder(raw, shown)
        tr = TarReader(dec.read_exact, dec.read_some, shown)
        _, man, _ = _read_manifest(tr, dec, shown)
        return (man, size, dec.requires) if with_requires else (man, size)


def _extract(raw: BinaryIO, shown: str, sink_root: Path | None, progress: Progress | None,
             expect_digest: str | None, on_manifest: Callable[[Manifest], None] | None = None
             ) -> tuple[Manifest, list[Problem]]:
    """Stream the archive; write listed files under ``sink_root`` if given. Fatal problems raise."""
    dec = _Decoder(raw, shown)
    tr = TarReader(dec.read_exact, dec.read_some, shown)
    name, man, mbytes = _read_manifest(tr, dec, shown)
    if expect_digest and man.digest() != expect_digest.strip().lower():
        raise ArchiveError(f"{shown}: run digest is {man.digest()}; expected {expect_digest.strip()}."
                           " This is not the archive you meant to unpack")
    if on_manifest:
        on_manifest(man)
    if progress is not None and hasattr(progress, "set_total"):
        progress.set_total(man.total_size())
    if sink_root is not None:
        (sink_root / MANIFEST_NAME).write_bytes(mbytes)
    listed = man.file_map()
    dirs = {"/".join(p.split("/")[:i]) for p in listed for i in range(1, p.count("/") + 1)}
    seen: dict[str, str] = {collision_key(MANIFEST_NAME): MANIFEST_NAME}
    problems: list[Problem] = []
    while (m := tr.next()) is not None:
        try:
            full = normalize_relpath(m.name, what="member")
        except UnsafePathError as e:
            raise ArchiveError(f"{shown}: {e}; refusing the archive") from None
        if m.kind == "dir" and full == name:
            continue
        if not full.startswith(name + "/"):
            raise ArchiveError(f"{shown}: member {m.name!r} is outside the run folder {name!r}/; refusing the archive")
        rel = full[len(name) + 1:]
        key = collision_key(rel)
        if key in seen:
            what = "appears twice" if seen[key] == rel or key == collision_key(MANIFEST_NAME) else \
                f"collides with {seen[key]!r} (case or Unicode normalisation)"
            raise ArchiveError(f"{shown}: member {m.name!r} {what}; refusing the archive")
        seen[key] = rel
        entry = listed.get(rel)
        if m.kind == "dir":
            if rel in listed:
                problems.append(Problem(rel, "type", "a regular file", "a folder"))
            elif rel not in dirs:
                problems.append(Problem(rel, "extra", "no such folder (not in the manifest)", "a folder in the archive"))
            continue
        if entry is None:
            problems.append(Problem(rel, "extra", "no such file (not in the manifest)", f"a member of {m.size} bytes"))
            tr.consume(None, _NullHash(), m.size, CHUNK)
            continue
        if m.size != entry.size:
            problems.append(Problem(rel, "size", f"{entry.size} bytes", f"{m.size} bytes"))
            tr.consume(None, _NullHash(), m.size, CHUNK)
            continue
        width = m.pax.get("APTBUNDLE.dense")
        unknown = sorted(k for k in m.pax if k.startswith("APTBUNDLE.") and k != "APTBUNDLE.dense")
        if unknown or (width is not None and (width not in ("2", "4") or dec.requires != "dense")):
            raise ArchiveError(f"{shown}: member {m.name!r} has aptbundle records {unknown or width!r} this"
                               " version does not know; upgrade aptbundle")
        h = hashlib.sha256()
        src = _UngroupingReader(tr, int(width), m.size) if width is not None else tr
        if sink_root is None and needs_scan(rel):
            problems += _consume_and_scan(src, h, m.size, rel, progress)
        elif sink_root is not None:
            target = sink_root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_BINARY", 0), 0o644)
            with open(fd, "wb", buffering=0) as out:
                src.consume(_Counting(out, progress), h, m.size, CHUNK)
            if needs_scan(rel) and h.hexdigest() == entry.sha256:
                try:
                    scan_file(target, rel)
                except UnsafeContentError as e:
                    problems.append(Problem(rel, "unsafe", "only tensors and plain data", str(e)))
        else:
            src.consume(_Counting(None, progress), h, m.size, CHUNK)
        if h.hexdigest() != entry.sha256:
            problems.append(Problem(rel, "hash", f"sha256 {entry.sha256[:16]}…", f"sha256 {h.hexdigest()[:16]}…"))
    for rel, entry in listed.items():
        if collision_key(rel) not in seen:
            problems.append(Problem(rel, "missing", f"{entry.size} bytes", "not in the archive"))
    dec.finish()
    return man, sorted(problems, key=lambda p: p.path)


def _consume_and_scan(tr, h, size: int, rel: str, progress: Progress | None) -> list[Problem]:
    """Hash a pickled or safetensors member and scan it statically from a private temporary copy
    (``verify`` of an archive unpacks nothing else)."""
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX) as d:
        path = Path(d) / "member"
        with open(path, "wb") as f:
            tr.consume(_Counting(f, progress), h, size, CHUNK)
        try:
            scan_file(path, rel)
        except UnsafeContentError as e:
            return [Problem(rel, "unsafe", "only tensors and plain data", str(e))]
    return []


class _UngroupingReader:
    """Wraps a TarReader for one dense member: consume() hands on the original bytes."""

    def __init__(self, inner: TarReader, width: int, size: int):
        self.inner, self.width, self.size = inner, width, size

    def consume(self, sink, hasher, size: int, chunk: int) -> None:
        from aptbundle.codec import BLOCK, Ungrouper

        ug = Ungrouper(self.width, size)

        class _Tap:
            def update(self, b: bytes) -> None:
                for piece in ug.feed(b):
                    hasher.update(piece)
                    if sink is not None:
                        sink.write(piece)

        self.inner.consume(None, _Tap(), size, BLOCK)


class _NullHash:
    def update(self, b: bytes) -> None:
        pass


class _Counting:
    """A write sink that reports progress (and passes bytes on to ``out`` if given)."""

    def __init__(self, out, progress: Progress | None):
        self.out, self.progress = out, progress

    def write(self, b: bytes) -> None:
        if self.out is not None:
            self.out.write(b)
        if self.progress:
            self.progress(len(b))


def unpack(archive: str | Path, dest: str | Path = ".", *, expect_digest: str | None = None,
           progress: Progress | None = None, on_manifest: Callable[[Manifest], None] | None = None) -> Path:
    """Unpack an archive into ``DEST/NAME`` safely; return that path.

    Everything is written into a fresh temporary folder beside ``DEST/NAME`` and renamed into
    place only when every member matched the manifest; on any problem nothing is left behind.

    >>> # unpack("run1.aptrun.tar.zst", "elsewhere")
    PosixPath('elsewhere/run1')
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    raw, shown, _ = _open_source(archive)
    tmp: Path | None = None
    state: dict = {}

    def start(man: Manifest) -> None:
        nonlocal tmp
        final = dest / man.name
        if final.exists() or final.is_symlink():
            raise ArchiveError(f"{final}: already exists; remove it or unpack with -C into another folder")
        clean_stale(dest, man.name)
        tmp = _temp_for(final)
        tmp.mkdir(mode=0o755)
        state["final"], state["tmp"] = final, tmp
        if on_manifest:
            on_manifest(man)

    try:
        with raw:
            man, problems = _extract(raw, shown, _LazyRoot(state), progress, expect_digest, start)
        if problems:
            raise VerifyError(problems, what=f"{shown} (not unpacked)")
        final = state["final"]
        if final.exists():
            raise ArchiveError(f"{final}: appeared while unpacking; nothing was changed")
        os.rename(state["tmp"], final)
        fsync_dir(dest)
        return final
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


class _LazyRoot:
    """A path-like root that resolves to the unpack's temporary folder once it exists."""

    def __init__(self, state: dict):
        self.state = state

    def __truediv__(self, rel: str) -> Path:
        return self.state["tmp"] / rel


def verify_archive(path: str | Path, progress: Progress | None = None):
    """Check an archive without unpacking it to disk; return a ``verify.Report``.

    >>> # verify_archive("run1.aptrun.tar.zst").ok
    """
    from aptbundle.verify import Report

    rep = Report(str(path), "archive")
    raw, shown, _ = _open_source(path)

    def seen(man: Manifest) -> None:
        rep.files, rep.size, rep.digest = len(man.files), man.total_size(), man.digest()

    with raw:
        try:
            _, rep.problems = _extract(raw, shown, None, progress, None, seen)
        except (ArchiveError, ManifestError, UnsafePathError) as e:
            rep.problems.append(Problem(shown, "archive", "a valid aptbundle archive", str(e)))
    return rep

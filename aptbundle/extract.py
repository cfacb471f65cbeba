"""Read an archive as a stream: its manifest, a verification, or a safe unpack.

Never ``extractall``: the manifest (the first member) is read and checked first; then each
member's name is checked against the path rules and the manifest, and each listed file is
created by aptbundle itself (exclusive create, fixed mode) in a fresh temporary folder while it
is hashed; the folder is renamed into place only when every byte checked out. zstd is handed
exactly one frame (``tarstream.FrameGuard``) and may not yield more than the manifest declares,
so trailing data, extra frames and decompression bombs are refused. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import zstandard

from aptbundle.errors import ArchiveError, ManifestError, UnsafePathError, VerifyError
from aptbundle.fsutil import TMP_PREFIX, Progress, announce_total, fsync_dir
from aptbundle.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, parse_manifest
from aptbundle.paths import check_name, collision_key, normalize_relpath
from aptbundle.run import Problem
from aptbundle.scan import needs_scan, unsafe_problems
from aptbundle.storage import CHUNK, SUFFIX, clean_stale, is_remote, remote_fs, temp_for
from aptbundle.tarstream import BLOCK as TAR_BLOCK
from aptbundle.tarstream import RECORD, FrameGuard, TarReader


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
        fs, rpath = remote_fs(str(path))
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
    announce_total(progress, man.total_size())
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
        src = _UngroupingReader(tr, int(width)) if width is not None else tr
        if sink_root is None and needs_scan(rel):
            problems += _consume_and_scan(src, h, m.size, rel, progress)
        elif sink_root is not None:
            target = sink_root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_BINARY", 0), 0o644)
            with open(fd, "wb", buffering=0) as out:
                src.consume(_Counting(out, progress), h, m.size, CHUNK)
            if h.hexdigest() == entry.sha256:
                problems += unsafe_problems(target.parents[rel.count("/")], [rel])  # the run's root
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
        (Path(d) / rel).parent.mkdir(parents=True)
        with open(Path(d) / rel, "wb") as f:
            tr.consume(_Counting(f, progress), h, size, CHUNK)
        return unsafe_problems(Path(d), [rel])


class _UngroupingReader:
    """Wraps a TarReader for one dense member: consume() hands on the original bytes."""

    def __init__(self, inner: TarReader, width: int):
        self.inner, self.width = inner, width

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
    state: dict[str, Path] = {}  # the final and temporary folders, known once the manifest is read

    def start(man: Manifest) -> None:
        final = dest / man.name
        if final.exists() or final.is_symlink():
            raise ArchiveError(f"{final}: already exists; remove it or unpack with -C into another folder")
        clean_stale(dest, man.name)
        state["final"], state["tmp"] = final, temp_for(final)
        state["tmp"].mkdir(mode=0o755)
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
        if "tmp" in state:
            shutil.rmtree(state["tmp"], ignore_errors=True)
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

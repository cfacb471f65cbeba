"""The one archive reader: the manifest first, then each listed file decoded and checked.

``ArchiveReader`` is a context manager over a local or remote ``.aptrun.tar.zst``. Entering it
reads the first member, the manifest, and checks it (name, size cap, records, optionally the
expected digest), so ``inspect`` stops there. ``members()`` then yields each member that the
manifest lists, already decoded (``codec``) and ready to be hashed and scanned in one pass by
``verify.check_stream``, with any other consumer (the file being unpacked) as a tap; what the
manifest does not describe is a problem (``problems``) or, for names that could escape, a fatal
``ArchiveError``. Never ``extractall``: the caller creates every file itself.

zstd is handed exactly one frame (``tarstream.FrameGuard``) and may not yield more than the
manifest declares, so trailing data, extra frames and decompression bombs are refused. Nothing
here imports torch.
"""

from __future__ import annotations

from typing import BinaryIO, Callable, Iterator

import zstandard

from aptbundle.transfer.codec import check_archive_records, member_decoder
from aptbundle.archive.storage import open_source
from aptbundle.archive.tarstream import TAR_BLOCK
from aptbundle.archive.tarstream import RECORD, TarReader
from aptbundle.transfer.frames import FrameGuard
from aptbundle.format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, FileEntry, Manifest, parse_manifest
from aptbundle.format.signature import MAX_SIGNATURE_BYTES, SIGNATURE_NAME
from aptbundle.format.verify import check_stream
from aptbundle.ground.ahead import ReadAhead
from aptbundle.ground.errors import ArchiveError, UnsafePathError
from aptbundle.ground.fsutil import BLOCK, Progress, announce_total
from aptbundle.ground.paths import check_name, collision_key, normalize_relpath
from aptbundle.ground.problems import Kind, Problem


class _Decoder:
    """Decompressed bytes of one zstd frame, with a hard cap on how many may come out.

    zstd runs in a thread of its own, a few blocks ahead of the reader (it releases the GIL),
    so decompressing overlaps with hashing and scanning on another core. ``close`` stops it.
    """

    AHEAD = 8  # blocks decompressed ahead of the reader: memory stays at a few MiB

    def __init__(self, raw: BinaryIO, label: str):
        self.label = label
        self.guard = FrameGuard(raw, label)
        self.reader = zstandard.ZstdDecompressor().stream_reader(
            self.guard, read_size=BLOCK, read_across_frames=False, closefd=False)
        self.total = 0
        self.cap = MAX_MANIFEST_BYTES + 4 * 65536 + 16 * TAR_BLOCK
        self._ahead = ReadAhead(self._block, self.AHEAD, "zstd")

    def _block(self) -> bytes:
        try:
            return self.reader.read(BLOCK)
        except zstandard.ZstdError as e:
            raise ArchiveError(f"{self.label}: corrupt zstd data ({e}); the archive is damaged") from None

    def close(self) -> None:
        """Stop the decompressing thread (it may be blocked handing out a block)."""
        self._ahead.close()

    def _raw_read(self, n: int) -> bytes:
        return self._ahead.read(n)

    def read_some(self, n: int) -> bytes:
        if self.total + n > self.cap:
            raise ArchiveError(f"{self.label}: decompresses to more than the manifest declares"
                               f" ({self.cap} bytes); refusing it as a decompression bomb")
        b = self._raw_read(n)
        if not b:
            raise ArchiveError(f"{self.label}: the tar stream ends early; the archive is truncated")
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
            b = self._raw_read(BLOCK)
            if not b:
                break
            slack += len(b)
            if slack > RECORD or b.count(0) != len(b):
                raise ArchiveError(f"{self.label}: data after the tar end-of-archive marker; expected nothing")
        self.close()
        self.guard.finish()


MAX_UNLISTED = 10_000  # members the manifest does not describe before the archive is refused outright


class Member:
    """One listed file of the archive, its data not yet read."""

    def __init__(self, reader: "ArchiveReader", entry: FileEntry, read: Callable[[int], bytes], mode: int = 0o644):
        self.reader, self.entry, self._read, self.mode = reader, entry, read, mode
        self.checked = False

    @property
    def rel(self) -> str:
        return self.entry.path

    def check(self, *, scan: bool = True, taps: list[Callable[[memoryview], None]] | None = None) -> list[Problem]:
        """Read the member once: hash it, scan it, hand every byte to ``taps``; the problems found."""
        if self.checked:
            raise ArchiveError(f"{self.reader.label}: member {self.rel!r} was already read")
        self.checked = True
        progress = self.reader.progress
        taps = list(taps or []) + ([lambda b: progress(len(b))] if progress else [])
        return check_stream(self._read, self.entry, scan=scan, taps=taps)


class ArchiveReader:
    """Read an archive as a stream: ``manifest`` on entry, then ``members()``.

    For example::

        with ArchiveReader("run1.aptrun.tar.zst") as ar:
            problems = [p for m in ar.members() for p in m.check()] + ar.problems
    """

    def __init__(self, source, *, progress: Progress | None = None, expect_digest: str | None = None):
        self.source, self.progress, self.expect_digest = source, progress, expect_digest
        self.problems: list[Problem] = []
        self.manifest: Manifest | None = None

    def __enter__(self) -> "ArchiveReader":
        self._raw, self.label, self.size = open_source(self.source)
        try:
            self._dec = _Decoder(self._raw, self.label)
            self._tar = TarReader(self._dec.read_exact, self._dec.read_some, self.label)
            self._read_manifest()
        except BaseException:
            if hasattr(self, "_dec"):
                self._dec.close()
            self._raw.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._dec.close()
        self._raw.close()

    def _read_manifest(self) -> None:
        shown, tr = self.label, self._tar
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
        self.requires = check_archive_records(m.pax, shown)
        chunks = []
        while b := tr.read_data(BLOCK):
            chunks.append(b)
        tr.end_member()
        self.manifest_bytes = b"".join(chunks)
        man = parse_manifest(self.manifest_bytes, f"{shown}:{m.name}")
        if man.name != name:
            raise ArchiveError(f"{shown}: folder {name!r} holds the manifest of run {man.name!r}; expected them equal")
        if self.expect_digest is not None and man.digest() != self.expect_digest.strip().lower():
            raise ArchiveError(f"{shown}: run digest is {man.digest()}; expected {self.expect_digest.strip()}."
                               " This is not the archive you meant to unpack")
        overhead = 8 * 1024
        dirs = {f.path.rsplit("/", 1)[0] for f in man.files if "/" in f.path}
        self._dec.cap = tr.offset + sum(f.size + overhead for f in man.files) + overhead * (len(dirs) + 1) + 2 * RECORD
        self.name, self.manifest = name, man
        self._read_signature()

    def _read_signature(self) -> None:
        """``NAME/aptrun.sig`` right after the manifest, if the archive is signed (else None)."""
        self.signature: bytes | None = None
        self._pending = m = self._tar.next()
        if m is None or m.name != f"{self.name}/{SIGNATURE_NAME}" or m.kind != "file":
            return
        if m.size > MAX_SIGNATURE_BYTES:
            raise ArchiveError(f"{self.label}: {m.name} is {m.size} bytes, over the {MAX_SIGNATURE_BYTES}-byte"
                               " limit for a signature; the archive is damaged or crafted")
        chunks = []
        while b := self._tar.read_data(BLOCK):
            chunks.append(bytes(b))
        self._tar.end_member()
        self.signature, self._pending = b"".join(chunks), self._tar.next()

    def _headers(self):
        """The member headers after the manifest (and signature), one by one."""
        m, self._pending = self._pending, None
        while m is not None:
            yield m
            m = self._tar.next()

    def members(self) -> Iterator[Member]:
        """Each listed member in archive order; afterwards ``problems`` holds what else was wrong."""
        shown, tr, man, name = self.label, self._tar, self.manifest, self.name
        announce_total(self.progress, man.total_size())
        listed = man.file_map()
        dirs = {"/".join(p.split("/")[:i]) for p in listed for i in range(1, p.count("/") + 1)}
        seen: dict[str, str] = {collision_key(MANIFEST_NAME): MANIFEST_NAME}
        if self.signature is not None:
            seen[collision_key(SIGNATURE_NAME)] = SIGNATURE_NAME
        problems = self.problems
        for m in self._headers():
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
                    problems.append(Problem(rel, Kind.TYPE, "a regular file", "a folder"))
                elif rel not in dirs:
                    problems.append(Problem(rel, Kind.EXTRA, "no such folder (not in the manifest)", "a folder in the archive"))
                continue
            if entry is None:
                problems.append(Problem(rel, Kind.EXTRA, "no such file (not in the manifest)", f"a member of {m.size} bytes"))
                if len(problems) > MAX_UNLISTED:
                    raise ArchiveError(f"{shown}: more than {MAX_UNLISTED} members the manifest does not list;"
                                       " refusing the archive")
                continue
            if m.size != entry.size:
                problems.append(Problem(rel, Kind.SIZE, f"{entry.size} bytes", f"{m.size} bytes"))
                continue
            decode = member_decoder(m.pax, self.requires, m.size, shown, m.name)
            member = Member(self, entry, decode(tr.read_data) if decode else tr.read_data, m.mode)
            yield member  # a member the caller did not read is skipped by the next tr.next()
        for rel, entry in listed.items():
            if collision_key(rel) not in seen:
                problems.append(Problem(rel, Kind.MISSING, f"{entry.size} bytes", "not in the archive"))
        self._dec.finish()
        problems.sort(key=lambda p: p.path)


def read_archive_manifest(path) -> tuple[Manifest, int]:
    """The manifest of an archive, reading only its first member; and the archive's size."""
    with ArchiveReader(path) as ar:
        return ar.manifest, ar.size

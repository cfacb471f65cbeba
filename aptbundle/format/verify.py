"""The one verifier: a run, one checkpoint of it, or one file, against the manifest.

Each file is read once: the same pass hashes it and, where its kind can hide code (pickles,
safetensors headers, DCP metadata), scans it (``scan``). ``verify_run`` checks a whole run
(every listed file, and no file that is not listed) or one checkpoint (its files and the run's
own files: config, tokenizer, data); it holds the run's commit lock, shared, so a trainer's
commit is never seen half done. ``verify_checkpoint`` is the boundary of every load: it
resolves ``latest``/``best``/a name, verifies, and returns a ``VerifiedCheckpoint`` that loaders
take instead of verifying again. Archives are checked member by member with ``check_stream``
by the archive reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aptbundle.format.manifest import CheckpointEntry, FileEntry
from aptbundle.format.pickles import MACHINE_PATH
from aptbundle.format.run import Run, walk_files
from aptbundle.format.scan import needs_scan, scan_stream, unsafe
from aptbundle.format.stream import RawRead, Stream, file_source
from aptbundle.format.trust import UNTRUSTED, UNTRUSTED_NOTE, policy_for
from aptbundle.ground.errors import ArchiveError, CheckpointError, UnsafeContentError, VerifyError
from aptbundle.ground.fsutil import Progress, announce_total
from aptbundle.ground.problems import Kind, Problem, Report, split


MAX_JSON_LOOKED_AT = 4 << 20  # JSON files up to this size are read for machine paths


def scan_verdict(stream: Stream, rel: str) -> list[Problem]:
    """What the scan finds in the file ``rel`` being read from ``stream``: the refusal (or, for a
    file the trust policy carries untrusted, a note), and notes of machine paths recorded in it."""
    paths: list[str] = []
    found: list[Problem] = []
    if rel.endswith(".json") and stream.size <= MAX_JSON_LOOKED_AT:
        _json_paths(stream.read(stream.size), paths)
    elif needs_scan(rel):
        try:
            scan_stream(stream, rel, paths)
        except UnsafeContentError as e:
            found.append(unsafe(rel, e))
        except (ArchiveError, OSError):
            raise
        except Exception as e:  # a malformed file the parsers did not foresee: refuse, never crash
            found.append(unsafe(rel, UnsafeContentError(f"{rel}: cannot be parsed ({type(e).__name__}); the file"
                                                        " is damaged or crafted. Do not load it")))
        if found and policy_for(rel) == UNTRUSTED:
            found = [Problem(rel, Kind.UNTRUSTED, "a file aptbundle may load", f"an arbitrary pickle, carried: {UNTRUSTED_NOTE}")]
    if paths:
        shown = ", ".join(repr(p[:80]) for p in paths[:3])
        found.append(Problem(rel, Kind.MACHINE_PATH, "no absolute paths of the machine that wrote it",
                             f"{shown}; found statically, never loaded. Paths that differ here may need editing"))
    return found


def _json_paths(data: bytes, paths: list[str]) -> None:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return
    todo, seen = [doc], 0
    while todo and seen < 100_000 and len(paths) < 8:
        v = todo.pop()
        seen += 1
        if isinstance(v, str):
            if MACHINE_PATH.match(v):
                paths.append(v)
        elif isinstance(v, dict):
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)


def check_stream(raw: RawRead, entry: FileEntry, *, scan: bool = True,
                 taps: list[Callable[[memoryview], None]] | None = None) -> list[Problem]:
    """Hash ``entry.size`` bytes of ``raw`` (and scan them) in one pass; the problems found.

    ``taps`` also see every byte (the file being unpacked, a progress bar). A size or hash
    mismatch is the only problem reported for a file: its content is not the listed one.
    """
    h = hashlib.sha256()
    stream = Stream(raw, entry.size, [h.update, *(taps or [])])
    found = scan_verdict(stream, entry.path) if scan else []
    stream.drain()
    if stream.short:
        return [Problem(entry.path, Kind.SIZE, f"{entry.size} bytes", f"{stream.pulled} bytes")]
    if stream.grew:
        return [Problem(entry.path, Kind.SIZE, f"{entry.size} bytes", "more (the file grew)")]
    sha = h.hexdigest()
    if sha != entry.sha256:
        return [Problem(entry.path, Kind.HASH, f"sha256 {entry.sha256[:16]}…", f"sha256 {sha[:16]}…")]
    return found


def check_file(root: Path, entry: FileEntry, *, scan: bool = True, quick: bool = False,
               progress: Progress | None = None) -> list[Problem]:
    """``check_stream`` on the file ``root/entry.path``, after cheap checks of its kind and size
    (``quick``: only those)."""
    full = root / entry.path
    try:
        st = os.lstat(full)
    except (FileNotFoundError, NotADirectoryError):
        return [Problem(entry.path, Kind.MISSING, f"{entry.size} bytes", "no such file")]
    if not stat.S_ISREG(st.st_mode):
        return [Problem(entry.path, Kind.TYPE, "a regular file", "a link or special file")]
    if st.st_size != entry.size:
        if progress:
            progress(entry.size)
        return [Problem(entry.path, Kind.SIZE, f"{entry.size} bytes", f"{st.st_size} bytes")]
    if quick:
        return []
    with open(full, "rb", buffering=0) as f:
        return check_stream(file_source(f), entry, scan=scan,
                            taps=[lambda b: progress(len(b))] if progress else None)


def hash_and_scan(root: Path, rel: str) -> tuple[FileEntry, list[Problem]]:
    """Size and SHA-256 of a file not yet listed, and what the scan found, in one pass."""
    full = root / rel
    size = os.lstat(full).st_size
    h = hashlib.sha256()
    with open(full, "rb", buffering=0) as f:
        stream = Stream(file_source(f), size, [h.update])
        found = scan_verdict(stream, rel)
        stream.drain()
    return FileEntry(rel, stream.pulled, h.hexdigest()), found


def verify_run(run: Run, *, scan: bool = True, quick: bool = False, progress: Progress | None = None,
               strict: bool = False) -> Report:
    """Verify the whole run: every listed file, and no file that is not listed. Every problem at
    once (and, apart, the notes: untrusted files carried, machine paths recorded; ``strict``
    makes an untrusted file a problem). ``quick``: presence, kind and size only, no byte read
    (the cheap gate before a long job)."""
    with run.reading():
        run.reload()
        on_disk, problems = walk_files(run.path, run.manifest.links)
        listed = run.manifest.file_map()
        problems += [Problem(p, Kind.EXTRA, "no such file (not in the manifest)", "a file on disk")
                     for p in on_disk if p not in listed]
        return _verify(run, "run", list(run.manifest.files), problems, scan, quick, progress, strict)


def verify_files(run: Run, paths: list[str], *, scan: bool = True, quick: bool = False,
                 progress: Progress | None = None, strict: bool = False) -> Report:
    """Verify only the listed files at ``paths`` (a path the manifest does not list is a problem)."""
    with run.reading():
        run.reload()
        listed = run.manifest.file_map()
        problems = [Problem(p, Kind.MISSING, "a file listed in the manifest", "not listed") for p in paths
                    if p not in listed]
        return _verify(run, "run", [listed[p] for p in paths if p in listed], problems, scan, quick, progress,
                       strict)


def verify_checkpoint_files(run: Run, entry: CheckpointEntry, *, progress: Progress | None = None,
                            strict: bool = False) -> Report:
    """Verify one checkpoint: its files and the run's own (config, tokenizer, data, logs)."""
    with run.reading():
        run.reload()
        entry = run.resolve_checkpoint(entry.name)
        entries = run.files_under(entry.folder)
        if not entries:
            raise CheckpointError(f"{run.name}: checkpoint {entry.name} lists no files in the manifest")
        return _verify(run, "checkpoint", entries + run.run_files(), [], True, False, progress, strict)


def _verify(run: Run, kind: str, entries: list[FileEntry], problems: list[Problem], scan: bool, quick: bool,
            progress: Progress | None, strict: bool) -> Report:
    """Check ``entries`` (the caller holds the run's read lock) into one ``Report``."""
    rep = Report(str(run.path), kind, len(entries), sum(f.size for f in entries), run.manifest.digest())
    announce_total(progress, rep.size)
    linked = _linked_folders(run.path, entries)
    for entry in entries:
        behind = next((d for d in linked if entry.path.startswith(d + "/")), None)
        if behind is not None:  # the file lives outside the run, wherever the link points
            problems.append(Problem(entry.path, Kind.TYPE, "a file inside the run",
                                    f"a file behind the symbolic link {behind}"))
            continue
        problems += check_file(run.path, entry, scan=scan, quick=quick, progress=progress)
    errors, notes = split(problems, strict)
    rep.problems = sorted(errors, key=lambda p: p.path)
    rep.notes = sorted(notes, key=lambda p: p.path)
    return rep


def _linked_folders(root: Path, entries: list[FileEntry]) -> list[str]:
    """The folders on the way to the listed files that are symbolic links (each looked at once)."""
    folders = {e.path.rsplit("/", 1)[0] for e in entries if "/" in e.path}
    parents = {f.rsplit("/", i)[0] for f in folders for i in range(f.count("/") + 1)}
    return sorted(d for d in parents if os.path.islink(root / d))


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint whose files (and the run's own files) matched the manifest and passed the scan.

    Loaders take this instead of a name, so what was verified is what is loaded.
    """

    run: Run
    entry: CheckpointEntry
    files: tuple[FileEntry, ...]

    @property
    def folder(self) -> Path:
        return self.run.path / self.entry.folder

    @property
    def name(self) -> str:
        return self.entry.name

    def has(self, name: str) -> bool:
        """True if the checkpoint lists the file ``name`` (relative to its folder)."""
        return any(f.path == f"{self.entry.folder}/{name}" for f in self.files)


def verify_checkpoint(run: Run, which: str = "latest", *, progress: Progress | None = None) -> VerifiedCheckpoint:
    """Resolve ``which`` and verify it; ``VerifyError`` naming every problem, else the proof.

    For example::

        ckpt = verify_checkpoint(Run.open("outputs/run1"), "latest"); ckpt.name
    """
    entry = run.resolve_checkpoint(which)
    rep = verify_checkpoint_files(run, entry, progress=progress)
    if not rep.ok:
        raise VerifyError(rep.problems, what=f"checkpoint {entry.name} of {run.name}")
    entry = run.resolve_checkpoint(entry.name)
    return VerifiedCheckpoint(run, entry, tuple(run.files_under(entry.folder)))

"""Unpacking and verifying an archive: two short loops over the one ``ArchiveReader``.

``unpack`` writes every listed file itself (exclusive create, the mode the archive records, no links
followed) into a fresh temporary folder beside ``DEST/NAME`` while hashing and scanning it,
and renames the folder into place only when every byte checked out; on any problem nothing is
left behind, not even a ``DEST`` it had to create. ``verify_archive`` runs the same checks and
writes nothing at all: pickles are scanned as they stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from aptbundle.archive.reader import ArchiveReader
from aptbundle.format import signature
from aptbundle.format.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest
from aptbundle.ground.errors import ArchiveError, ManifestError, SignatureError, SourceError, UnsafePathError, \
    VerifyError
from aptbundle.ground.fsutil import Progress
from aptbundle.ground.problems import Kind, Problem, Report, split
from aptbundle.transfer.materialize import materialize


def unpack(archive: str | Path, dest: str | Path = ".", *, expect_digest: str | None = None,
           progress: Progress | None = None, on_manifest: Callable[[Manifest], None] | None = None,
           max_size: int | None = None, trust: list[str | Path] | None = None, strict: bool = False,
           notes: list[Problem] | None = None) -> Path:
    """Unpack an archive into ``DEST/NAME`` safely; return that path.

    The size the manifest declares is checked first: against ``max_size`` if given, and against
    the free space of ``DEST`` (an archive of a few kB may declare terabytes). With ``trust``
    (public key files), an archive not signed by one of them is refused before anything is
    written; a signature travels into the run folder as ``aptrun.sig``. Files carried as untrusted
    and machine paths found inside files are appended to ``notes`` (``strict``: an untrusted file
    is refused). The run's links (``last.ckpt`` -> a listed file) are made again. An existing
    ``DEST/NAME`` is never touched: the unpack is refused.
    """
    keys = [signature.load_public_key(k) for k in trust or []]
    with ArchiveReader(archive, progress=progress, expect_digest=expect_digest) as ar:
        if keys:
            signature.check(ar.signature, ar.name, ar.manifest.digest(), keys, ar.label)
        with materialize(dest, ar.name, declared=ar.manifest.total_size(), max_size=max_size,
                         shown=ar.label) as out:
            if on_manifest:
                on_manifest(ar.manifest)
            out.write(MANIFEST_NAME, ar.manifest_bytes)
            if ar.signature is not None:
                out.write(SIGNATURE_NAME, ar.signature)
            problems: list[Problem] = []
            for m in ar.members():
                with out.create(m.rel, m.mode) as f:
                    problems += m.check(taps=[f.write])
            problems, found_notes = split(problems + ar.problems, strict)
            if problems:
                raise VerifyError(problems, what=f"{ar.label} (not unpacked)")
            if notes is not None:
                notes += found_notes
            return out.finish(ar.manifest)


def verify_archive(path: str | Path, progress: Progress | None = None,
                   trust: list[str | Path] | None = None, strict: bool = False) -> Report:
    """Check an archive as a stream, writing nothing to disk; a ``Report`` of every problem.

    With ``trust`` (public key files), a missing or untrusted signature is a problem too.

    For example::

        verify_archive("run1.aptrun.tar.zst").ok
    """
    rep = Report(str(path), "archive")
    keys = [signature.load_public_key(k) for k in trust or []]
    shown = Path(str(path)).name if "://" not in str(path) else str(path).rsplit("/", 1)[-1]
    try:
        with ArchiveReader(path, progress=progress) as ar:
            man = ar.manifest
            rep.files, rep.size, rep.digest = len(man.files), man.total_size(), man.digest()
            if keys:
                try:
                    signature.check(ar.signature, ar.name, rep.digest, keys, ar.label)
                except SignatureError as e:
                    rep.problems.append(Problem(SIGNATURE_NAME, Kind.SIGNATURE, "signed by a trusted key",
                                                str(e).removeprefix(f"{ar.label}: ")))
            for m in ar.members():
                rep.problems += m.check()
            rep.problems += ar.problems
            rep.problems, rep.notes = split(rep.problems, strict)
    except SourceError:  # an archive that cannot be opened at all is an error, not a report
        raise
    except (ArchiveError, ManifestError, UnsafePathError) as e:
        rep.problems.append(Problem(shown, Kind.ARCHIVE, "a valid aptbundle archive", str(e).removeprefix(f"{shown}: ")))
    rep.problems.sort(key=lambda p: p.path)
    return rep

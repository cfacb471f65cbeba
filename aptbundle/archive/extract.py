"""Unpacking and verifying an archive: two short loops over the one ``ArchiveReader``.

``unpack`` writes every listed file itself (exclusive create, the mode the archive records, no links
followed) into a fresh temporary folder beside ``DEST/NAME`` while hashing and scanning it,
and renames the folder into place only when every byte checked out; on any problem nothing is
left behind, not even a ``DEST`` it had to create. ``verify_archive`` runs the same checks and
writes nothing at all: pickles are scanned as they stream.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from aptbundle.archive.reader import ArchiveReader
from aptbundle.format import signature
from aptbundle.format.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest
from aptbundle.ground import temporaries
from aptbundle.ground.errors import (ArchiveError, ManifestError, SignatureError, SourceError, UnsafePathError,
                                     VerifyError)
from aptbundle.ground.fsutil import Progress, fsync_dir
from aptbundle.ground.problems import Problem, Report, split

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


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
    is refused). The run's links (``last.ckpt`` -> a listed file) are made again.

    >>> # unpack("run1.aptrun.tar.zst", "elsewhere")
    PosixPath('elsewhere/run1')
    """
    dest = Path(dest)
    keys = [signature.load_public_key(k) for k in trust or []]
    made = [d for d in [dest, *dest.parents] if not d.exists()]
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with ArchiveReader(archive, progress=progress, expect_digest=expect_digest) as ar:
            final = dest / ar.name
            if final.exists() or final.is_symlink():
                raise ArchiveError(f"{final}: already exists; remove it or unpack with -C into another folder")
            if keys:
                signature.check(ar.signature, ar.name, ar.manifest.digest(), keys, ar.shown)
            _check_size(ar.manifest.total_size(), dest, max_size, ar.shown)
            temporaries.clean_stale(dest, ar.name)
            if on_manifest:
                on_manifest(ar.manifest)
            with temporaries.temp_dir(dest, ar.name) as tmp:
                _write(tmp / MANIFEST_NAME, ar.manifest_bytes)
                if ar.signature is not None:
                    _write(tmp / SIGNATURE_NAME, ar.signature)
                problems: list[Problem] = []
                for m in ar.members():
                    target = tmp / m.rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with open(os.open(target, _CREATE, 0o600), "wb") as out:
                        problems += m.check(taps=[out.write])
                        _set_mode(out, target, m.mode)
                problems += ar.problems
                problems, found_notes = split(problems, strict)
                if problems:
                    raise VerifyError(problems, what=f"{ar.shown} (not unpacked)")
                make_links(tmp, ar.manifest)
                if notes is not None:
                    notes += found_notes
                if final.exists():
                    raise ArchiveError(f"{final}: appeared while unpacking; nothing was changed")
                os.rename(tmp, final)
        fsync_dir(dest)
        return final
    except BaseException:
        for d in made:  # leave DEST as it was found: remove the folders this unpack created
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _check_size(declared: int, dest: Path, max_size: int | None, shown: str) -> None:
    if max_size is not None and declared > max_size:
        raise ArchiveError(f"{shown}: declares {declared} bytes of data, over --max-size {max_size};"
                           " raise the limit if you expected a run this large")
    free = shutil.disk_usage(dest).free
    if declared > free:
        raise ArchiveError(f"{shown}: declares {declared} bytes of data; {dest} has {free} bytes free."
                           " Free space or unpack with -C elsewhere")


def make_links(root: Path, man: Manifest) -> None:
    """Make the run's links again (each checked by the manifest rules: to a listed file, inside)."""
    for link in man.links:
        path = root / link.path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(link.target, path)
        except OSError:  # no symbolic links here (Windows without the right): a copy serves as well
            shutil.copyfile(root / link.resolved(), path)


def _set_mode(f, path: Path, mode: int) -> None:
    """The mode the archive records (0644, 0600, 0755...), never writable by others, always the
    owner's to read and write."""
    mode = (mode & 0o755) | 0o600
    if hasattr(os, "fchmod"):
        os.fchmod(f.fileno(), mode)
    else:  # Windows: only the read-only bit exists, and it is never set here
        os.chmod(path, mode)


def _write(path: Path, data: bytes) -> None:
    with open(os.open(path, _CREATE, 0o644), "wb") as f:
        f.write(data)


def verify_archive(path: str | Path, progress: Progress | None = None,
                   trust: list[str | Path] | None = None, strict: bool = False) -> Report:
    """Check an archive as a stream, writing nothing to disk; a ``Report`` of every problem.

    With ``trust`` (public key files), a missing or untrusted signature is a problem too.

    >>> # verify_archive("run1.aptrun.tar.zst").ok
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
                    signature.check(ar.signature, ar.name, rep.digest, keys, ar.shown)
                except SignatureError as e:
                    rep.problems.append(Problem(SIGNATURE_NAME, "signature", "signed by a trusted key",
                                                str(e).removeprefix(f"{ar.shown}: ")))
            for m in ar.members():
                rep.problems += m.check()
            rep.problems += ar.problems
            rep.problems, rep.notes = split(rep.problems, strict)
    except SourceError:  # an archive that cannot be opened at all is an error, not a report
        raise
    except (ArchiveError, ManifestError, UnsafePathError) as e:
        rep.problems.append(Problem(shown, "archive", "a valid aptbundle archive", str(e).removeprefix(f"{shown}: ")))
    rep.problems.sort(key=lambda p: p.path)
    return rep

"""The materializer: how ``unpack`` and ``pull`` make a run appear at ``DEST/NAME``.

Everything is written into a fresh temporary folder beside ``DEST/NAME`` (same file system, so
the final rename is atomic): every file created by aptbundle itself (exclusive create, no link
followed, the mode the run records), after the declared size was checked against ``--max-size``
and the free space of ``DEST``. Only when every byte checked out does the folder take ``NAME``'s
place; on any failure the temporary folder goes, and so does every folder of ``DEST`` that had
to be created, so ``DEST`` is left as it was.

**Never lose the user's data.** An existing ``DEST/NAME`` is replaced only when it is the same run
(its ``run_id``), the copy on disk is an ancestor of the incoming state (its digest is in the
incoming history, or it holds no checkpoint that the incoming state lacks or has differently),
and it holds nothing its manifest does not list (files the ignore rules leave out count: they
are the user's). Otherwise nothing is written and the refusal names what differs and what to
do. ``force`` moves the old copy aside under a new name, said in the result; it never deletes it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from aptbundle.format.manifest import Manifest
from aptbundle.format.run import Run
from aptbundle.ground import temporaries
from aptbundle.ground.errors import AptBundleError, MaterializeError
from aptbundle.ground.fsutil import fsync_dir
from aptbundle.ground.temporaries import remove_path

CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


@dataclass(frozen=True)
class Existing:
    """What is at ``DEST/NAME`` before a pull: the run there (None if it is not one), and where it
    goes when it is moved aside (None when it is replaced or there is nothing)."""

    path: Path
    run: Run | None
    aside: Path | None


def check_replace(final: Path, incoming: Manifest, *, force: bool, what: str) -> Existing | None:
    """Decide whether the incoming state may take ``final``'s place (``what`` names the source in
    messages); raise ``MaterializeError`` naming what differs when it may not."""
    if not (final.exists() or final.is_symlink()):
        return None
    old = _open_run(final)
    reasons = differences(old, incoming) if old is not None else [
        "is not a run (no readable aptrun.json)"]
    if not reasons:
        return Existing(final, old, None)
    if force:
        return Existing(final, old, _aside_name(final))
    e = MaterializeError(f"{final}: {'; '.join(reasons)}; nothing was changed. Pull with -C into another folder,"
                         f" or pass --force to move {final.name} aside (it is never deleted) and take {what}")
    # the same run, only ahead of the incoming state: a caller may carry on from it (``restore``)
    e.newer_copy = old is not None and old.manifest.run_id == incoming.run_id and not old.unlisted()
    raise e


def differences(old: Run, incoming: Manifest) -> list[str]:
    """Why ``old`` may not be replaced by ``incoming`` (empty when it may)."""
    have = old.manifest
    if have.run_id != incoming.run_id:
        return [f"holds another run with the same name (run_id {have.run_id[:12]}, not {incoming.run_id[:12]})"]
    out = []
    newer = newer_checkpoints(have, incoming)
    if newer:
        out.append(f"holds {len(newer)} checkpoint(s) the incoming state lacks or has differently"
                   f" ({_few(newer)}): it is newer, or went its own way")
    unlisted = old.unlisted()
    if unlisted:
        out.append(f"holds {len(unlisted)} file(s) its manifest does not list ({_few(unlisted)}), which a"
                   " replacement would lose")
    return out


def newer_checkpoints(have: Manifest, incoming: Manifest) -> list[str]:
    """The checkpoints of ``have`` that ``incoming`` does not carry exactly; none when ``have``'s
    digest is one ``incoming`` grew from (its history names it)."""
    digest = have.digest()
    if digest == incoming.digest() or digest in {h.get("from_digest") for h in incoming.history if isinstance(h, dict)}:
        return []
    out = []
    for c in have.checkpoints:
        theirs = incoming.checkpoint(c.name)
        mine = {(f.path, f.sha256) for f in have.files_of(c)}
        if theirs is None or mine != {(f.path, f.sha256) for f in incoming.files_of(theirs)}:
            out.append(c.name)
    return out


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f", and {len(names) - 5} more" if len(names) > 5 else "")


def _open_run(final: Path) -> Run | None:
    if final.is_symlink() or not final.is_dir() or not Run.is_run(final):
        return None
    try:
        return Run.open(final)
    except AptBundleError:
        return None


def _aside_name(final: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        cand = final.with_name(f"{final.name}.old-{stamp}" + (f"-{i}" if i else ""))
        if not (cand.exists() or cand.is_symlink()):
            return cand
    raise MaterializeError(f"{final}: no free name to move it aside; move it yourself")


def check_size(declared: int, dest: Path, max_size: int | None, shown: str) -> None:
    """Refuse a declared size over ``max_size`` or over the free space of ``dest``."""
    if max_size is not None and declared > max_size:
        raise MaterializeError(f"{shown}: declares {declared} bytes of data, over --max-size {max_size};"
                               " raise the limit if you expected a run this large")
    free = shutil.disk_usage(dest).free
    if declared > free:
        raise MaterializeError(f"{shown}: declares {declared} bytes of data; {dest} has {free} bytes free."
                               " Free space or choose another folder with -C")


class Materializer:
    """The temporary folder a run is built in, and how it takes its place (see the module)."""

    def __init__(self, tmp: Path, final: Path, existing: Existing | None):
        self.tmp, self.final, self.existing = tmp, final, existing

    def create(self, rel: str, mode: int = 0o644) -> BinaryIO:
        """A new file at ``rel`` (its folders made), opened for writing; never an existing one."""
        target = self.tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        f = open(os.open(target, CREATE, 0o600), "wb")
        set_mode(f, target, mode)
        return f

    def write(self, rel: str, data: bytes, mode: int = 0o644) -> None:
        with self.create(rel, mode) as f:
            f.write(data)

    def link_from(self, source: Path, rel: str) -> Path:
        """Hard-link ``source`` (a file of the copy being replaced) to ``rel``; ``OSError`` where
        links are not possible. The caller checks the bytes again."""
        target = self.tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, target, follow_symlinks=False)
        return target

    def finish(self, man: Manifest) -> Path:
        """Make the run's links, then put the folder in place (the old copy replaced, or moved
        aside); returns the run's path."""
        make_links(self.tmp, man)
        if self.existing is None:
            if self.final.exists() or self.final.is_symlink():
                raise MaterializeError(f"{self.final}: appeared meanwhile; nothing was changed")
            os.rename(self.tmp, self.final)
            return self.final
        aside = self.existing.aside or temporaries.temp_path(self.final.parent, self.final.name + "-old")
        os.rename(self.final, aside)
        os.rename(self.tmp, self.final)
        if self.existing.aside is None:
            remove_path(aside)  # a replaced ancestor: everything it held is in the new copy
        return self.final


@contextlib.contextmanager
def materialize(dest: str | Path, name: str, *, declared: int, max_size: int | None, shown: str,
                existing: Existing | None = None, replacing: bool = False) -> Iterator[Materializer]:
    """A ``Materializer`` for ``DEST/NAME``: ``declared`` bytes are checked first; ``existing`` is
    what ``check_replace`` allowed to go (``replacing=False``: an existing ``NAME`` is refused)."""
    dest = Path(dest)
    made = [d for d in [dest, *dest.parents] if not d.exists()]
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / name
    try:
        if not replacing and (final.exists() or final.is_symlink()):
            raise MaterializeError(f"{final}: already exists; remove it or choose another folder with -C")
        check_size(declared, dest, max_size, shown)
        temporaries.clean_stale(dest, name)
        with contextlib.ExitStack() as held:
            if existing is not None and existing.run is not None:
                held.enter_context(existing.run.writer())  # a run being trained is never replaced
            with temporaries.temp_dir(dest, name) as tmp:
                yield Materializer(tmp, final, existing)
        fsync_dir(dest)
    except BaseException:
        for d in made:  # leave DEST as it was found: remove the folders this created
            try:
                d.rmdir()
            except OSError:
                break
        raise


def make_links(root: Path, man: Manifest) -> None:
    """Make the run's links again (each checked by the manifest rules: to a listed file, inside)."""
    for link in man.links:
        path = root / link.path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(link.target, path)
        except OSError:  # no symbolic links here (Windows without the right): a copy serves as well
            shutil.copyfile(root / link.resolved(), path)


def set_mode(f, path: Path, mode: int) -> None:
    """The mode the run records (0644, 0600, 0755...), never writable by others, always the
    owner's to read and write."""
    mode = (mode & 0o755) | 0o600
    if hasattr(os, "fchmod"):
        os.fchmod(f.fileno(), mode)
    else:  # Windows: only the read-only bit exists, and it is never set here
        os.chmod(path, mode)


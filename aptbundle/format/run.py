"""A run directory: create or open it, list its checkpoints, write into it, clean up after a crash.

The manifest (``aptrun.json``) is the commit point. Files are written atomically first; only
then does the manifest list them (``Run.save_manifest``, under the commit lock). Checking a run
against its manifest is ``verify``'s job; keeping writers apart is ``lock``'s.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import shutil
import stat
import sys
import uuid
from pathlib import Path
from typing import Iterator

from aptbundle.format.ignore import IGNORE_FILE, Ignore
from aptbundle.format.scan import needs_scan
from aptbundle.format.manifest import (MANIFEST_NAME, SIGNATURE_NAME, CheckpointEntry, FileEntry, LinkEntry, Manifest,
                                      load_manifest)
from aptbundle.ground import lock, temporaries
from aptbundle.ground.errors import RunError, UnsafePathError
from aptbundle.ground.fsutil import Progress, SpecialFile, atomic_write_bytes, hash_file, read_capped
from aptbundle.ground.paths import check_collisions, check_name, normalize_relpath
from aptbundle.ground.problems import Kind, Problem
from aptbundle.ground.temporaries import remove_path

CHECKPOINTS = "checkpoints"


def now_iso() -> str:
    """UTC time stamp, second precision, ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def environment_info(device: str | None = None) -> dict:
    """Versions and hardware a run is written on. Never imports torch itself."""
    env = {
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "aptbundle": __import__("aptbundle").__version__,
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch"] = torch.__version__
        env["threads"] = torch.get_num_threads()
    if device is not None:
        env["device"] = device
    return env


def is_ignored(rel: str) -> bool:
    """The manifest, its signature, the lock files and work in progress are never part of a run's
    listing."""
    return rel in (MANIFEST_NAME, SIGNATURE_NAME) or lock.is_lock_name(rel) or any(
        temporaries.is_temp_name(c) for c in rel.split("/"))


def walk_files(root: Path, links: list[LinkEntry] | None = None) -> tuple[list[str], list[Problem]]:
    """Relative POSIX paths of the regular files below ``root`` and problems with the rest.

    Symbolic links (other than the run's own ``links``, each pointing where it says), devices,
    FIFOs and unportable names are problems; aptbundle's own lock and temporary names, and what
    the ignore rules (``ignore``) leave out, are skipped. A file the ignore rules keep out that
    the scan would have read (a pickle, a torch file) is a note (``Kind.HIDDEN``): it is never
    checked and never travels, and whoever loads it where it lies should know.
    """
    files: list[str] = []
    problems: list[Problem] = []
    known = {x.path: x.target for x in links or []}
    ignore = Ignore(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        rel_base = base.relative_to(root).as_posix()
        for d in list(dirnames):
            rel = d if rel_base == "." else f"{rel_base}/{d}"
            if temporaries.is_temp_name(d):
                dirnames.remove(d)
            elif ignore.dir_ignored(rel):
                dirnames.remove(d)
                problems += _hidden(base / d, rel)
            elif (base / d).is_symlink():
                dirnames.remove(d)
                problems.append(Problem(rel, Kind.TYPE, "a regular file or folder", "a symbolic link"))
        for name in filenames:
            rel = name if rel_base == "." else f"{rel_base}/{name}"
            if is_ignored(rel):
                continue
            if ignore.file_ignored(rel):
                problems += _hidden(base / name, rel)
                continue
            st = os.lstat(base / name)
            if stat.S_ISLNK(st.st_mode) and rel in known:
                target = os.readlink(base / name)
                if target != known[rel]:
                    problems.append(Problem(rel, Kind.LINK, f"a link to {known[rel]}", f"a link to {target}"))
                continue
            if not stat.S_ISREG(st.st_mode):
                kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a special file"
                problems.append(Problem(rel, Kind.TYPE, "a regular file", kind))
                continue
            try:
                files.append(normalize_relpath(rel, what="file"))
            except UnsafePathError as e:
                problems.append(Problem(rel, Kind.UNSAFE, "a portable name", str(e)))
    found = set(files) | {p.path for p in problems}
    for rel, target in known.items():
        if rel not in found and not os.path.islink(root / rel):
            problems.append(Problem(rel, Kind.LINK, f"a link to {target}", "no such link"))
    files.sort()
    return files, problems


@contextlib.contextmanager
def building_run(run_dir: Path, name: str) -> Iterator[Path]:
    """A fresh temporary folder beside ``run_dir`` to build a new run in; when the block ends it
    takes ``run_dir``'s place (which must be absent or an empty folder), and when the block fails
    it is removed, so a kill while creating a run never leaves half a run at its name."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    temporaries.clean_stale(run_dir.parent, name)
    with temporaries.temp_dir(run_dir.parent, name) as tmp:
        yield tmp
        if run_dir.exists():
            run_dir.rmdir()
        os.rename(tmp, run_dir)


MAX_HIDDEN_NOTES = 100


def _hidden(path: Path, rel: str) -> list[Problem]:
    """Notes for the files below an ignored ``path`` that the scan would have read."""
    found = [rel] if path.is_file() and needs_scan(rel) else []
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
            base = Path(dirpath).relative_to(path).as_posix()
            found += [r for n in filenames if needs_scan(r := f"{rel}/{n}" if base == "." else f"{rel}/{base}/{n}")]
            if len(found) >= MAX_HIDDEN_NOTES:
                break
    return [Problem(r, Kind.HIDDEN, "a file that travels or is scanned", "a pickle or torch file that"
                    f" {IGNORE_FILE} keeps out: never checked, never moved; do not load it without checking it")
            for r in found[:MAX_HIDDEN_NOTES]]


class Run:
    """An aptbundle run directory.

    For example::

        run = Run.open("outputs/run1"); run.latest.name
    """

    def __init__(self, path: Path, manifest: Manifest):
        self.path = Path(path)
        self.manifest = manifest

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> "Run":
        """Open an existing run; ``ManifestError`` if ``path`` holds no valid manifest."""
        p = Path(path)
        if not p.is_dir():
            raise RunError(f"{path}: no such run folder; expected a folder holding {MANIFEST_NAME}")
        return cls(p, load_manifest(p))

    @classmethod
    def create(cls, path: str | Path, *, trainer: str | None = None, name: str | None = None) -> "Run":
        """Create a new empty run at ``path`` (its folder name is the run's name)."""
        p = Path(path)
        name = check_name(name or p.resolve().name)
        if (p / MANIFEST_NAME).exists():
            raise RunError(f"{p}: already a run; open it instead of creating it")
        p.mkdir(parents=True, exist_ok=True)
        t = now_iso()
        run = cls(p, Manifest(name=name, run_id=uuid.uuid4().hex, trainer=trainer,
                              created_at=t, updated_at=t, environment=environment_info()))
        run.save_manifest()
        return run

    @staticmethod
    def is_run(path: str | Path) -> bool:
        """True when ``path`` holds a manifest."""
        return (Path(path) / MANIFEST_NAME).is_file()

    def reload(self) -> None:
        """Read the manifest again (another process may have committed)."""
        self.manifest = load_manifest(self.path)

    # -- locks -------------------------------------------------------------------------------
    def writer(self):
        """The writer lock: one training session (or adoption) at a time."""
        return lock.writer(self.path)

    lock = writer  # the name of 0.1

    def reading(self):
        """The commit lock, shared: the run does not change until the block ends."""
        return lock.reading(self.path)

    def committing(self):
        """The commit lock, exclusive: readers wait until the commit is complete."""
        return lock.committing(self.path)

    # -- views -------------------------------------------------------------------------------
    def unlisted(self) -> list[str]:
        """Every file, link or special file in the folder that the manifest does not list,
        including those the ignore rules leave out (they are the user's): what replacing the
        folder would lose. aptbundle's own names (the manifest, its signature, locks and
        temporaries) are not counted."""
        listed = {f.path for f in self.manifest.files} | {x.path for x in self.manifest.links}
        out = []
        for dirpath, dirnames, filenames in os.walk(self.path, followlinks=False):
            rel_base = Path(dirpath).relative_to(self.path).as_posix()
            for d in list(dirnames):
                if temporaries.is_temp_name(d) or os.path.islink(os.path.join(dirpath, d)):
                    dirnames.remove(d)
                    if not temporaries.is_temp_name(d):
                        out.append(d if rel_base == "." else f"{rel_base}/{d}")
            for name in filenames:
                rel = name if rel_base == "." else f"{rel_base}/{name}"
                if rel not in listed and not is_ignored(rel):
                    out.append(rel)
        return sorted(out)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def checkpoints(self) -> list[CheckpointEntry]:
        """Checkpoints in step order."""
        return list(self.manifest.checkpoints)

    @property
    def latest(self) -> CheckpointEntry | None:
        return self.manifest.checkpoint(self.manifest.latest) if self.manifest.latest else None

    @property
    def best(self) -> CheckpointEntry | None:
        return self.manifest.checkpoint(self.manifest.best.name) if self.manifest.best else None

    def resolve_checkpoint(self, which: str = "latest") -> CheckpointEntry:
        """``latest``, ``best`` or a checkpoint name (``step-00000500``) -> its entry."""
        if which == "latest":
            entry = self.latest
        elif which == "best":
            entry = self.best
        else:
            entry = self.manifest.checkpoint(Path(which).name)
        if entry is None:
            have = ", ".join(c.name for c in self.checkpoints) or "none"
            raise RunError(
                f"{self.name}: no checkpoint {which!r} in the manifest (checkpoints: {have});"
                " choose latest, best or one of those names"
            )
        return entry

    def checkpoint_dir(self, name: str) -> Path:
        """The folder of checkpoint ``name`` (``checkpoints/NAME`` unless the manifest says otherwise)."""
        entry = self.manifest.checkpoint(name)
        return self.path / (entry.folder if entry else f"{CHECKPOINTS}/{name}")

    def files_under(self, prefix: str) -> list[FileEntry]:
        """Manifest entries inside the folder ``prefix`` (or the one file ``prefix`` is: a
        checkpoint that is a single file, like Lightning's ``.ckpt``)."""
        return self.manifest.files_under(prefix)

    def run_files(self) -> list[FileEntry]:
        """Manifest entries outside every checkpoint (config, tokenizer, data, logs)."""
        folders = tuple(c.folder + "/" for c in self.manifest.checkpoints)
        single = {c.folder for c in self.manifest.checkpoints}
        return [f for f in self.manifest.files if not f.path.startswith(folders) and f.path not in single]

    # -- writing (callers hold the writer lock; the manifest is saved under the commit lock) ---
    def record_file(self, rel: str, progress: Progress | None = None) -> FileEntry:
        """Hash a file already in the run and list it in the in-memory manifest."""
        rel = normalize_relpath(rel, what="file")
        size, sha = hash_file(self.path / rel, progress)
        entry = FileEntry(rel, size, sha)
        files = [f for f in self.manifest.files if f.path != rel] + [entry]
        check_collisions([f.path for f in files], what="file")
        self.manifest.files = sorted(files, key=lambda f: f.path)
        return entry

    def write_file(self, rel: str, data: bytes) -> FileEntry:
        """Atomically write ``data`` to ``rel`` and list it (the manifest is saved by the caller)."""
        rel = normalize_relpath(rel, what="file")
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
        return self.record_file(rel)

    def forget_prefix(self, prefix: str) -> None:
        """Drop every manifest entry under the folder ``prefix`` (or the file ``prefix``; files are
        not touched)."""
        gone = set(self.manifest.files_under(prefix))
        self.manifest.files = [f for f in self.manifest.files if f not in gone]

    def save_manifest(self) -> None:
        """Atomically write the manifest: the commit point of every change."""
        self.manifest.updated_at = now_iso()
        atomic_write_bytes(self.path / MANIFEST_NAME, self.manifest.to_bytes())
        # a signature is of one state of the run: once it changes, the old one would only mislead
        (self.path / SIGNATURE_NAME).unlink(missing_ok=True)

    def signature(self) -> bytes | None:
        """The run's ``aptrun.sig`` (unchecked; see ``signature.check``), or None."""
        from aptbundle.format.signature import MAX_SIGNATURE_BYTES

        try:
            return read_capped(self.path / SIGNATURE_NAME, MAX_SIGNATURE_BYTES, follow_links=False)
        except FileNotFoundError:
            return None
        except SpecialFile:
            return b""  # not a signature: checking it fails, a carried one is never this

    def to_retire(self, keep_last: int | None) -> list[CheckpointEntry]:
        """The checkpoints a retention of the last ``keep_last`` lets go (never latest or best)."""
        if keep_last is None:
            return []
        keep = {c.name for c in self.manifest.checkpoints[-keep_last:]}
        keep.add(self.manifest.latest)
        if self.manifest.best:
            keep.add(self.manifest.best.name)
        return [c for c in self.manifest.checkpoints if c.name not in keep]

    def retire(self, entries: list[CheckpointEntry]) -> list[Path]:
        """Drop checkpoints from the in-memory manifest; return their folders, to delete once the
        manifest is saved (a crash in between leaves only unlisted folders, which ``recover`` removes)."""
        folders = []
        for c in entries:
            self.forget_prefix(c.folder)
            self.manifest.checkpoints.remove(c)
            folders.append(self.path / c.folder)
        listed = {f.path for f in self.manifest.files}
        for link in [x for x in self.manifest.links if x.resolved() not in listed]:  # a link to what went
            self.manifest.links.remove(link)
            folders.append(self.path / link.path)
        self.manifest.untrusted = [u for u in self.manifest.untrusted if u in listed]
        return folders

    def start_session(self, **info) -> dict:
        """Append a history entry for a training session (saved with the next commit)."""
        entry = {"started_at": now_iso(), **info}
        self.manifest.history.append(entry)
        return entry

    # -- crash recovery ------------------------------------------------------------------------
    def _put_back(self, saved: Path) -> bool:
        """A commit killed between rewriting a run file and saving the manifest left the file's
        previous content under a ``was-NAME`` temporary: put it back when that is what the
        manifest lists and the file is not."""
        who = temporaries.owner(saved.name)
        if who is None or not who[1].startswith("was-") or not saved.is_file():
            return False
        target = saved.parent / who[1][len("was-"):]
        entry = self.manifest.file_map().get(target.relative_to(self.path).as_posix())
        if entry is None or not target.is_file() or hash_file(target)[1] == entry.sha256 \
                or hash_file(saved)[1] != entry.sha256:
            return False
        os.replace(saved, target)
        return True

    def recover(self) -> list[str]:
        """Remove what an interrupted writer left: its temporaries and unlisted checkpoint folders.

        Call only while holding the writer lock. A temporary of a live process (a ``pack``
        reading the run) is left alone. Returns the relative paths removed.
        """
        removed = []
        for dirpath, dirnames, filenames in os.walk(self.path, followlinks=False):
            for n in list(dirnames) + filenames:
                if temporaries.is_temp_name(n) and (temporaries.owner(n) is None or temporaries.is_stale(n)):
                    full = Path(dirpath) / n
                    if not self._put_back(full):
                        remove_path(full)
                    removed.append(full.relative_to(self.path).as_posix())
                if n in dirnames and temporaries.is_temp_name(n):
                    dirnames.remove(n)
        listed = {c.name for c in self.manifest.checkpoints}
        owned = {f.path.split("/")[1] for f in self.files_under(CHECKPOINTS) if f.path.count("/") >= 1}
        ck = self.path / CHECKPOINTS
        if ck.is_dir():
            for d in ck.iterdir():
                if d.is_dir() and not d.is_symlink() and d.name not in listed and d.name not in owned \
                        and not temporaries.is_temp_name(d.name):
                    shutil.rmtree(d)
                    removed.append(d.relative_to(self.path).as_posix())
        return removed



def prune(path: str | Path, keep_last: int, *, dry_run: bool = False) -> tuple[list[str], int]:
    """Delete all checkpoints but the last ``keep_last`` (and the latest and best), atomically:
    the manifest stops listing them in one commit, then their folders go. Returns the names
    pruned and the bytes they held.

    For example::

        prune("outputs/run1", keep_last=1)
    """
    if keep_last < 1:
        raise RunError(f"--keep-last {keep_last}: expected at least 1")
    run = Run.open(path)
    with run.writer(), run.committing():
        run.reload()
        gone = run.to_retire(keep_last)
        size = sum(f.size for c in gone for f in run.files_under(c.folder))
        if not dry_run and gone:
            folders = run.retire(gone)
            run.save_manifest()
            for d in folders:
                remove_path(d)
    return [c.name for c in gone], size

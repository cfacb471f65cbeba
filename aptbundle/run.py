"""A run directory: create or open it, list its checkpoints, write into it, verify it.

The manifest (``aptrun.json``) is the commit point. Files are written atomically first; only
then does the manifest list them. ``verify`` rehashes every file and reports every problem at
once; ``recover`` removes what an interrupted writer left behind (temporary files, checkpoint
folders the manifest does not know). ``lock`` keeps a second writer out.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from aptbundle.errors import RunError, RunLockedError, UnsafePathError
from aptbundle.fsutil import Progress, announce_total, atomic_write_bytes, hash_file, is_temp_name
from aptbundle.manifest import (
    MANIFEST_NAME,
    CheckpointEntry,
    FileEntry,
    Manifest,
    load_manifest,
)
from aptbundle.paths import check_collisions, check_name, normalize_relpath

LOCK_NAME = ".aptrun.lock"
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


@dataclass
class Problem:
    """One way a run or archive differs from its manifest."""

    path: str
    kind: str  # missing | extra | size | hash | unsafe | type
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.path}: {self.kind}: expected {self.expected}, found {self.found}"

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "expected": self.expected, "found": self.found}


def _ignored(rel: str) -> bool:
    return rel in (MANIFEST_NAME, LOCK_NAME) or any(is_temp_name(c) for c in rel.split("/"))


def walk_files(root: Path) -> tuple[list[str], list[Problem]]:
    """Relative POSIX paths of the regular files below ``root`` and problems with the rest.

    Symbolic links, devices, FIFOs and unportable names are problems; aptbundle's own lock and
    temporary names are skipped.
    """
    files: list[str] = []
    problems: list[Problem] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        rel_base = base.relative_to(root).as_posix()
        for d in list(dirnames):
            rel = d if rel_base == "." else f"{rel_base}/{d}"
            if is_temp_name(d):
                dirnames.remove(d)
            elif (base / d).is_symlink():
                dirnames.remove(d)
                problems.append(Problem(rel, "type", "a regular file or folder", "a symbolic link"))
        for name in filenames:
            rel = name if rel_base == "." else f"{rel_base}/{name}"
            if _ignored(rel):
                continue
            st = os.lstat(base / name)
            if not stat.S_ISREG(st.st_mode):
                kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a special file"
                problems.append(Problem(rel, "type", "a regular file", kind))
                continue
            try:
                files.append(normalize_relpath(rel, what="file"))
            except UnsafePathError as e:
                problems.append(Problem(rel, "unsafe", "a portable name", str(e)))
    files.sort()
    return files, problems


class Run:
    """An aptbundle run directory.

    >>> # run = Run.open("outputs/run1"); run.latest.name
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

    # -- views -------------------------------------------------------------------------------
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
        """Manifest entries inside the folder ``prefix``."""
        pre = prefix.rstrip("/") + "/"
        return [f for f in self.manifest.files if f.path.startswith(pre)]

    # -- writing -----------------------------------------------------------------------------
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
        """Drop every manifest entry under the folder ``prefix`` (files are not touched)."""
        pre = prefix.rstrip("/") + "/"
        self.manifest.files = [f for f in self.manifest.files if not f.path.startswith(pre)]

    def save_manifest(self) -> None:
        """Atomically write the manifest: the commit point of every change."""
        self.manifest.updated_at = now_iso()
        atomic_write_bytes(self.path / MANIFEST_NAME, self.manifest.to_bytes())

    # -- checking ----------------------------------------------------------------------------
    def verify(self, progress: Progress | None = None, *, only: list[str] | None = None) -> list[Problem]:
        """Rehash files and return every problem (empty list: the run is intact).

        ``only`` restricts the check to those manifest paths and skips the search for extra files.
        """
        problems: list[Problem] = []
        fmap = self.manifest.file_map()
        if only is None:
            on_disk, problems = walk_files(self.path)
            for rel in on_disk:
                if rel not in fmap:
                    problems.append(Problem(rel, "extra", "no such file (not in the manifest)", "a file on disk"))
            targets = list(fmap.values())
        else:
            targets = [fmap[p] for p in only if p in fmap]
            problems += [Problem(p, "missing", "a file listed in the manifest", "not listed") for p in only if p not in fmap]
        for entry in targets:
            full = self.path / entry.path
            try:
                st = os.lstat(full)
            except (FileNotFoundError, NotADirectoryError):
                problems.append(Problem(entry.path, "missing", f"{entry.size} bytes", "no such file"))
                continue
            if not stat.S_ISREG(st.st_mode):
                problems.append(Problem(entry.path, "type", "a regular file", "something else"))
                continue
            if st.st_size != entry.size:
                problems.append(Problem(entry.path, "size", f"{entry.size} bytes", f"{st.st_size} bytes"))
                if progress:
                    progress(entry.size)
                continue
            size, sha = hash_file(full, progress, limit=entry.size)
            if size != entry.size:
                problems.append(Problem(entry.path, "size", f"{entry.size} bytes", f"{size} bytes"))
            elif sha != entry.sha256:
                problems.append(Problem(entry.path, "hash", f"sha256 {entry.sha256[:16]}…", f"sha256 {sha[:16]}…"))
        problems.sort(key=lambda p: p.path)
        return problems

    # -- crash recovery and locking ------------------------------------------------------------
    def recover(self) -> list[str]:
        """Remove what an interrupted writer left: temporary files and unlisted checkpoints.

        Call only while holding ``lock()``. Returns the relative paths removed.
        """
        removed = []
        listed = {c.name for c in self.manifest.checkpoints}
        for dirpath, dirnames, filenames in os.walk(self.path, followlinks=False):
            for n in list(dirnames) + filenames:
                if is_temp_name(n):
                    full = Path(dirpath) / n
                    shutil.rmtree(full) if full.is_dir() and not full.is_symlink() else full.unlink()
                    removed.append(full.relative_to(self.path).as_posix())
                    if n in dirnames:
                        dirnames.remove(n)
        ck = self.path / CHECKPOINTS
        if ck.is_dir():
            for d in ck.iterdir():
                if d.is_dir() and not d.is_symlink() and d.name not in listed:
                    shutil.rmtree(d)
                    removed.append(d.relative_to(self.path).as_posix())
        return removed

    def writer_active(self) -> bool:
        """True while another live process holds the writer lock (a trainer is writing)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover
            return False
        try:
            fd = os.open(self.path / LOCK_NAME, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock we may have taken
        return False

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run's writer lock; ``RunLockedError`` if another live process holds it.

        The lock is an ``flock`` on ``.aptrun.lock``: the kernel drops it when its holder dies,
        so a crashed trainer never leaves the run locked.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks, single writer assumed
            yield
            return
        path = self.path / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
                os.close(fd)
                raise RunLockedError(
                    f"{self.path}: is being written by process {holder}; wait for it to finish"
                    " or stop it, then try again"
                ) from None
            try:  # the holder before us may have removed the file: then lock the new one
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            # remove while still holding the lock, so no folder is left with a stray lock file
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)


def adopt(path: str | Path, *, trainer: str | None = None, progress: Progress | None = None) -> Run:
    """Write a manifest for an existing folder (for example a Hugging Face Trainer output).

    Checkpoint folders named ``checkpoints/step-N``, ``checkpoint-N`` or ``checkpoints/checkpoint-N``
    are listed as checkpoints. Refuses a folder that is already a run, or that holds links,
    special files or unportable names (all of them named).

    >>> # adopt("hf_output/").manifest.latest
    """
    p = Path(path)
    if not p.is_dir():
        raise RunError(f"{path}: no such folder; expected the training output folder to adopt")
    if Run.is_run(p):
        raise RunError(f"{path}: already has {MANIFEST_NAME}; use `aptbundle verify {path}` instead")
    name = check_name(p.resolve().name)
    files, problems = walk_files(p)
    if not problems:
        try:
            check_collisions(files, what="file")
        except UnsafePathError as e:
            problems.append(Problem(str(path), "unsafe", "portable file names", str(e)))
    if problems:
        from aptbundle.errors import VerifyError

        raise VerifyError(problems, what=f"{path} cannot be adopted")
    from aptbundle.scan import scan_file  # the static content check: refuse pickles that run code

    t = now_iso()
    run = Run(p, Manifest(name=name, run_id=uuid.uuid4().hex, trainer=trainer, created_at=t,
                          updated_at=t, environment=environment_info()))
    announce_total(progress, sum((p / rel).stat().st_size for rel in files))
    for rel in files:
        scan_file(p / rel, rel)
        run.record_file(rel, progress)
    run.manifest.checkpoints = _find_checkpoints(p, files)
    if run.manifest.checkpoints:
        run.manifest.latest = run.manifest.checkpoints[-1].name
    run.save_manifest()
    return run


def _find_checkpoints(root: Path, files: list[str]) -> list[CheckpointEntry]:
    import json
    import re

    # checkpoints/step-N or checkpoints/checkpoint-N (ours), checkpoint-N (Hugging Face Trainer)
    pat = re.compile(r"^(checkpoints/)?((?:step|checkpoint)-(\d+))/")
    found: dict[str, tuple[int, str | None]] = {}
    for rel in files:
        m = pat.match(rel)
        if m and (m.group(1) or m.group(2).startswith("checkpoint-")):
            found[m.group(2)] = (int(m.group(3)), None if m.group(1) else m.group(2))
    entries = []
    for name, (step, folder) in found.items():
        epoch: int | float = 0
        metrics: dict = {}
        state = root / (folder or f"{CHECKPOINTS}/{name}") / "trainer_state.json"
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            data = json.loads(state.read_text("utf-8"))
            if isinstance(data.get("epoch"), (int, float)):
                epoch = data["epoch"]
            losses = [h["loss"] for h in data.get("log_history", []) if isinstance(h.get("loss"), (int, float))]
            if losses:
                metrics["loss"] = losses[-1]
        entries.append(CheckpointEntry(name, step, epoch, metrics, folder))
    return sorted(entries, key=lambda c: c.step)

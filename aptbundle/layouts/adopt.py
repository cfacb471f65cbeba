"""Adopt a training output folder, and follow it while it grows (``aptbundle init [--update]``).

``adopt`` writes the manifest a folder lacks: every file hashed and, where it can hide code,
scanned in the same pass, each by its trust policy (``format.trust``); every refused file is
reported at once. The framework that wrote the folder is recognised (``layouts``): its
checkpoints with step, epoch and loss, the best one and the loss curves come from its own
records. A symbolic link to a file of the folder (Lightning's ``last.ckpt``) is recorded as a
link; any other link is refused. ``update`` brings an adopted folder's manifest up to date:
new files and checkpoints in, deleted ones out, changed files hashed again; it says what changed.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aptbundle.format.manifest import MANIFEST_NAME, FileEntry, LinkEntry, Manifest
from aptbundle.format.metrics import checked_curves
from aptbundle.format.run import Run, environment_info, now_iso, walk_files
from aptbundle.format.verify import hash_and_scan
from aptbundle.ground.errors import RunError, UnsafePathError, VerifyError
from aptbundle.ground.fsutil import Progress, announce_total
from aptbundle.ground.paths import check_collisions, check_name
from aptbundle.ground.problems import Kind, Problem, split
from aptbundle.layouts import detect


def _walk(root: Path) -> tuple[list[str], list[LinkEntry], list[Problem], list[Problem]]:
    """The folder's regular files, its links to them, what cannot be adopted, and the notes (files
    the ignore rules keep out that the scan would have read)."""
    files, found = walk_files(root)
    problems, notes = split(found)
    listed = set(files)
    links, rest = [], []
    for p in problems:
        link = _as_link(root, p, listed) if p.kind == Kind.TYPE and p.found == "a symbolic link" else None
        if link:
            links.append(link)
        else:
            rest.append(p)
    if not rest:
        try:
            check_collisions(files + [x.path for x in links], what="file")
        except UnsafePathError as e:
            rest.append(Problem(str(root), Kind.UNSAFE, "portable file names", str(e)))
    return files, links, rest, notes


def _as_link(root: Path, p: Problem, listed: set[str]) -> LinkEntry | None:
    """The link at ``p.path`` as a ``LinkEntry`` if it points to a listed file of the folder."""
    try:
        target = os.readlink(root / p.path)
    except OSError:
        return None
    base = posixpath.dirname(p.path)
    if os.path.isabs(target):  # an absolute link into the folder itself: recorded relative
        real_root = os.path.realpath(root)
        real = os.path.realpath(target)
        if not real.startswith(real_root + os.sep):
            return None
        target = posixpath.relpath(Path(real).relative_to(real_root).as_posix(), base or ".")
    target = target.replace(os.sep, "/")
    link = LinkEntry(p.path, target)
    return link if link.resolved() in listed and not link.resolved().startswith("../") else None


Known = dict  # (path, inode, size, mtime) -> (FileEntry, problems): files hashed and scanned before


def _hash_all(root: Path, rels: list[str], progress: Progress | None,
              known: Known | None = None) -> tuple[list[FileEntry], list[Problem]]:
    """Hash and scan ``rels``; with ``known``, a file seen before unchanged (the same inode, size
    and time: a hard link of it) is taken from there instead of read again, and what is read is
    added to it."""
    announce_total(progress, sum((root / rel).stat().st_size for rel in rels))
    entries, found = [], []
    for rel in rels:
        st = os.stat(root / rel)
        key = (rel, st.st_ino, st.st_size, st.st_mtime_ns)
        if known is not None and key in known:
            entry, problems = known[key]
        else:
            entry, problems = hash_and_scan(root, rel)
            if known is not None:
                known[key] = (entry, problems)
        entries.append(entry)
        found += problems
        if progress:
            progress(entry.size)
    return entries, found


def _record_paths(m: Manifest, notes: list[Problem], replaced: set[str] | None = None) -> None:
    """Remember which files record machine paths (``inspect`` shows it without reading them)."""
    old = m.extra.get("machine_paths") if isinstance(m.extra.get("machine_paths"), dict) else {}
    listed = m.file_map()
    kept = {k: v for k, v in old.items() if k in listed and k not in (replaced or set())}
    kept.update({n.path: n.found[:400] for n in notes if n.kind == Kind.MACHINE_PATH})
    if kept:
        m.extra["machine_paths"] = dict(sorted(kept.items()))
    else:
        m.extra.pop("machine_paths", None)


def _describe(run: Run, files: list[str]) -> None:
    """Checkpoints, latest, best, curves and layout, from the framework's own records."""
    m = run.manifest
    found = detect(run.path, files)
    m.layout = found.layout if found else None
    m.checkpoints = found.checkpoints if found else []
    m.latest = m.checkpoints[-1].name if m.checkpoints else None
    m.best = found.best if found else None
    curves = checked_curves(found.curves) if found else {}
    if curves:
        m.extra["curves"] = curves
    else:
        m.extra.pop("curves", None)
    if found and found.missing:
        m.extra["weights_only"] = {k: v for k, v in sorted(found.missing.items()) if v}
    else:
        m.extra.pop("weights_only", None)
    if found and found.notes:
        m.extra["framework_notes"] = found.notes
    else:
        m.extra.pop("framework_notes", None)
    if found:
        m.history = [h for h in m.history if not (isinstance(h, dict) and "framework" in h)] + found.history


def adopt(path: str | Path, *, trainer: str | None = None, progress: Progress | None = None,
          strict: bool = False, notes: list[Problem] | None = None, name: str | None = None,
          run_id: str | None = None, known: Known | None = None) -> Run:
    """Write a manifest for an existing folder (a Hugging Face Trainer, accelerate, Lightning or
    DCP output, a ``save_pretrained`` folder, or any folder of files).

    Refuses a folder that is already a run, or that holds links out of it, special files,
    unportable names or files that would run code when loaded (all of them named). Files a
    framework never loads (``training_args.bin``) are carried and marked untrusted, or refused
    with ``strict``; they and machine paths found in files are appended to ``notes``. ``name``
    and ``run_id`` name the run otherwise than by its folder and a fresh id (a snapshot of a
    folder that is being backed up); ``known`` is a cache of files hashed before (``_hash_all``).

    For example::

        adopt("hf_output/").manifest.latest
        # -> 'checkpoint-40'
    """
    p = Path(path)
    if not p.is_dir():
        raise RunError(f"{path}: no such folder; expected the training output folder to adopt")
    if Run.is_run(p):
        raise RunError(f"{path}: already has {MANIFEST_NAME}; `aptbundle init --update {path}` takes in what"
                       f" changed, `aptbundle verify {path}` checks it")
    name = check_name(name if name is not None else p.resolve().name)
    files, links, problems, hidden = _walk(p)
    if problems:
        raise VerifyError(problems, what=f"{path} cannot be adopted")
    t = now_iso()
    run = Run(p, Manifest(name=name, run_id=run_id or uuid.uuid4().hex, trainer=trainer, created_at=t,
                          updated_at=t, environment=environment_info()))
    with run.writer():
        entries, found = _hash_all(p, files, progress, known)
        problems, found_notes = split(found, strict)
        if problems:
            raise VerifyError(problems, what=f"{path} cannot be adopted")
        run.manifest.files = entries
        run.manifest.links = links
        run.manifest.untrusted = sorted(n.path for n in found_notes if n.kind == Kind.UNTRUSTED)
        _record_paths(run.manifest, found_notes)
        _describe(run, files)
        with run.committing():
            run.save_manifest()
    if notes is not None:
        notes += found_notes + hidden
    return run


@dataclass
class Changes:
    """What ``update`` changed in a manifest."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    checkpoints_added: list[str] = field(default_factory=list)
    checkpoints_removed: list[str] = field(default_factory=list)
    digest: str = ""

    @property
    def any(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def update(path: str | Path, *, progress: Progress | None = None, strict: bool = False,
           notes: list[Problem] | None = None) -> Changes:
    """Bring a run's manifest up to date with its folder, in one commit; what changed.

    New files are hashed and scanned, deleted ones dropped, and files whose size changed or that
    were written after the manifest are hashed again; the checkpoints, best and curves are read
    again from the framework's records. A run that a trainer is writing is refused.
    """
    run = Run.open(path)
    with run.writer():
        run.reload()
        old = run.manifest.file_map()
        stamp = os.stat(run.path / MANIFEST_NAME).st_mtime_ns
        files, links, problems, hidden = _walk(run.path)
        if problems:
            raise VerifyError(problems, what=f"{path} cannot be updated")
        changes = Changes(added=[f for f in files if f not in old], removed=sorted(set(old) - set(files)))
        for rel in files:
            if rel in old:
                st = os.stat(run.path / rel)
                if st.st_size != old[rel].size or st.st_mtime_ns > stamp:
                    changes.changed.append(rel)
        fresh, found = _hash_all(run.path, changes.added + changes.changed, progress)
        problems, found_notes = split(found, strict)
        if problems:
            raise VerifyError(problems, what=f"{path} cannot be updated")
        by_path = {**{f: old[f] for f in files if f in old}, **{e.path: e for e in fresh}}
        changes.changed = [e.path for e in fresh if e.path in old and e.sha256 != old[e.path].sha256]
        before = {c.name for c in run.manifest.checkpoints}
        untrusted = set(run.manifest.untrusted) - set(changes.removed) - {e.path for e in fresh}
        links_changed = links != run.manifest.links
        run.manifest.files = [by_path[f] for f in files]
        run.manifest.links = links
        run.manifest.untrusted = sorted(untrusted | {n.path for n in found_notes if n.kind == Kind.UNTRUSTED})
        _record_paths(run.manifest, found_notes, {e.path for e in fresh})
        if run.manifest.trainer is None:  # an adopted folder: its framework's records say what is what
            _describe(run, files)
        after = {c.name for c in run.manifest.checkpoints}
        changes.checkpoints_added = sorted(after - before)
        changes.checkpoints_removed = sorted(before - after)
        if changes.any or links_changed:
            run.manifest.history.append({"updated_at": now_iso(), "added": len(changes.added),
                                         "removed": len(changes.removed), "changed": len(changes.changed)})
            with run.committing():
                run.save_manifest()
        changes.digest = run.manifest.digest()
    if notes is not None:
        notes += found_notes + hidden
    return changes

"""Adopt an existing training output folder: write the manifest it lacks (``aptbundle init``).

Every file is hashed and, where it can hide code, scanned in the same pass; every refused file
is reported at once. Checkpoint folders named ``checkpoints/step-N``, ``checkpoint-N`` (the
Hugging Face Trainer's) or ``checkpoints/checkpoint-N`` are listed as checkpoints.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

from aptbundle.format.manifest import MANIFEST_NAME, CheckpointEntry, Manifest
from aptbundle.format.run import CHECKPOINTS, Run, environment_info, now_iso, walk_files
from aptbundle.format.verify import hash_and_scan
from aptbundle.ground.errors import RunError, UnsafePathError, VerifyError
from aptbundle.ground.fsutil import Progress, announce_total
from aptbundle.ground.paths import check_collisions, check_name
from aptbundle.ground.problems import Problem

# checkpoints/step-N or checkpoints/checkpoint-N (ours), checkpoint-N (Hugging Face Trainer)
_CHECKPOINT = re.compile(r"^(checkpoints/)?((?:step|checkpoint)-(\d+))/")


def adopt(path: str | Path, *, trainer: str | None = None, progress: Progress | None = None) -> Run:
    """Write a manifest for an existing folder (for example a Hugging Face Trainer output).

    Refuses a folder that is already a run, or that holds links, special files, unportable
    names or files that would run code when loaded (all of them named).

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
        raise VerifyError(problems, what=f"{path} cannot be adopted")
    t = now_iso()
    run = Run(p, Manifest(name=name, run_id=uuid.uuid4().hex, trainer=trainer, created_at=t,
                          updated_at=t, environment=environment_info()))
    with run.writer():
        announce_total(progress, sum((p / rel).stat().st_size for rel in files))
        entries = []
        for rel in files:
            entry, found = hash_and_scan(p, rel)
            entries.append(entry)
            if found:
                problems.append(found)
            if progress:
                progress(entry.size)
        if problems:
            raise VerifyError(problems, what=f"{path} cannot be adopted")
        run.manifest.files = entries
        run.manifest.checkpoints = _find_checkpoints(p, files)
        if run.manifest.checkpoints:
            run.manifest.latest = run.manifest.checkpoints[-1].name
        with run.committing():
            run.save_manifest()
    return run


def _find_checkpoints(root: Path, files: list[str]) -> list[CheckpointEntry]:
    found: dict[str, tuple[int, str | None]] = {}
    for rel in files:
        m = _CHECKPOINT.match(rel)
        if m and (m.group(1) or m.group(2).startswith("checkpoint-")):
            found[m.group(2)] = (int(m.group(3)), None if m.group(1) else m.group(2))
    entries = []
    for name, (step, folder) in found.items():
        epoch: int | float = 0
        metrics: dict = {}
        state = root / (folder or f"{CHECKPOINTS}/{name}") / "trainer_state.json"
        try:
            data = json.loads(state.read_text("utf-8"))
            if isinstance(data.get("epoch"), (int, float)):
                epoch = data["epoch"]
            losses = [h["loss"] for h in data.get("log_history", []) if isinstance(h.get("loss"), (int, float))]
            if losses:
                metrics["loss"] = losses[-1]
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        entries.append(CheckpointEntry(name, step, epoch, metrics, folder))
    return sorted(entries, key=lambda c: c.step)

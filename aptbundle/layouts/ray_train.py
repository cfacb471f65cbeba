"""Ray Train: a run's folder under ``storage_path/NAME`` with ``checkpoint_<timestamp>/`` folders
and ``checkpoint_manager_snapshot.json`` (Ray 2.x's Train V2), or a trial folder's
``checkpoint_000000/`` folders (the older layout).

What each checkpoint reported (``ray.train.report(metrics, checkpoint=...)``) comes from the
snapshot: its step (a ``step`` or ``training_iteration`` metric, else its place in the order of
reports), epoch and loss. A checkpoint's folder holds whatever the training loop wrote into it,
so whether it can resume is the loop's business: nothing is claimed missing. Ray continues a run
when it is started again with the same ``RunConfig(storage_path, name)``.
"""

from __future__ import annotations

import json
import posixpath
import re
from pathlib import Path

from aptbundle.format.manifest import CheckpointEntry
from aptbundle.ground.fsutil import read_capped
from aptbundle.ground.values import finite_number
from aptbundle.layouts import Found

LAYOUT, TITLE = "ray-train", "Ray Train"
SNAPSHOT = "checkpoint_manager_snapshot.json"
_DIR = re.compile(r"^((?:[^/]+/)*)(checkpoint_(\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}\.\d{1,6}|\d{6}))/")
MAX_SNAPSHOT_BYTES = 16 << 20


def recognise(root: Path, files: list[str]) -> Found | None:
    folders = sorted({m.group(1) + m.group(2) for rel in files if (m := _DIR.match(rel))})
    if not folders:
        return None
    reported = _snapshot(root, files)
    out = Found(LAYOUT, TITLE)
    for i, folder in enumerate(folders):
        name = folder.rsplit("/", 1)[-1]
        metrics = reported.get(folder, {})
        step = next((int(v) for k in ("step", "global_step", "training_iteration")
                     if (v := finite_number(metrics.get(k))) is not None and 0 <= v < 2 ** 53), None)
        epoch = finite_number(metrics.get("epoch"))
        numbers = {k: v for k, v in metrics.items() if isinstance(k, str) and finite_number(v) is not None
                   and k in ("loss", "train_loss", "val_loss", "eval_loss")}
        out.checkpoints.append(CheckpointEntry(name, step if step is not None else i + 1,
                                               epoch if epoch is not None and abs(epoch) < 2 ** 53 else 0,
                                               numbers, folder))
    curves = [[c.step, float(c.metrics["loss"])] for c in sorted(out.checkpoints, key=lambda c: c.step)
              if "loss" in c.metrics]
    if curves:
        out.curves["loss"] = curves
    out.history.append({"framework": TITLE, "checkpoints": len(folders)})
    return out


def _snapshot(root: Path, files: list[str]) -> dict[str, dict]:
    """Checkpoint folder (run-relative) -> the metrics reported with it, from every snapshot."""
    out: dict[str, dict] = {}
    for rel in (f for f in files if f.rsplit("/", 1)[-1] == SNAPSHOT):
        try:
            data = json.loads(read_capped(root / rel, MAX_SNAPSHOT_BYTES)[:MAX_SNAPSHOT_BYTES])
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            continue
        base = posixpath.dirname(rel)
        results = data.get("checkpoint_results") if isinstance(data, dict) else None
        for r in results if isinstance(results, list) else []:
            if isinstance(r, dict) and isinstance(r.get("checkpoint_dir_name"), str) \
                    and isinstance(r.get("metrics"), dict) and "/" not in r["checkpoint_dir_name"]:
                out[posixpath.join(base, r["checkpoint_dir_name"])] = r["metrics"]
    return out


def resume_call(run: str, checkpoint: CheckpointEntry | None) -> str:
    parent, name = posixpath.split(run.rstrip("/")) if "/" in run.rstrip("/") else (".", run)
    call = f'TorchTrainer(train_loop, ..., run_config=RunConfig(storage_path="{parent}", name="{name}")).fit()'
    if checkpoint is not None:
        call += f"  # train.get_checkpoint() in the loop is {run}/{checkpoint.folder} when it is the latest"
    return call

"""A plain folder of checkpoints: ``checkpoints/step-N/`` or ``checkpoints/checkpoint-N/`` (the
shape aptbundle's own runs have) or ``checkpoint-N/`` at the top without the Trainer's
``trainer_state.json``. Step from the name; epoch and loss from a ``trainer_state.json`` when
there is one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from aptbundle.format.manifest import CheckpointEntry
from aptbundle.ground.values import is_finite as finite
from aptbundle.layouts import Found, lacking

LAYOUT, TITLE = "checkpoints", "a folder of checkpoints"
_RESUME = {"optimizer": ("optimizer",), "scheduler": ("scheduler",), "rng": ("rng_state",),
           "trainer_state": ("trainer_state",)}
_CHECKPOINT = re.compile(r"^(checkpoints/)?((?:step|checkpoint)-(\d+))/")


def recognise(root: Path, files: list[str]) -> Found | None:
    found: dict[str, tuple[int, str | None]] = {}
    for rel in files:
        m = _CHECKPOINT.match(rel)
        if m and (m.group(1) or m.group(2).startswith("checkpoint-")) and len(m.group(3)) < 16:
            found[m.group(2)] = (int(m.group(3)), None if m.group(1) else m.group(2))
    if not found:
        return None
    out = Found(LAYOUT, TITLE)
    for name, (step, folder) in found.items():
        epoch: int | float = 0
        metrics: dict = {}
        try:
            with open(root / (folder or f"checkpoints/{name}") / "trainer_state.json", "rb") as f:
                data = json.loads(f.read(1 << 20))
            if finite(data.get("epoch")):
                epoch = data["epoch"]
            losses = [h["loss"] for h in data.get("log_history", []) if isinstance(h, dict) and finite(h.get("loss"))]
            if losses:
                metrics["loss"] = losses[-1]
        except (OSError, ValueError, TypeError, AttributeError, RecursionError):
            pass
        out.checkpoints.append(CheckpointEntry(name, step, epoch, metrics, folder))
        base = folder or f"checkpoints/{name}"
        gone = lacking({rel[len(base) + 1:] for rel in files if rel.startswith(base + "/")}, _RESUME)
        if gone:
            out.missing[name] = gone
    return out


def resume_call(run: str, checkpoint: CheckpointEntry | None) -> str:
    return (f"your training code, loading {run}/{checkpoint.folder if checkpoint else 'checkpoints/...'}; or, if a"
            f" trainer registered with aptbundle wrote it, adopt the folder again with `aptbundle init --trainer NAME`")

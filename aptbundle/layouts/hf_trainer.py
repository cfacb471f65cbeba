"""The Hugging Face ``Trainer``'s ``output_dir``: ``checkpoint-N/`` folders with ``trainer_state.json``.

Each checkpoint's step and epoch come from its ``trainer_state.json``, its loss (and eval loss)
from the ``log_history`` entries up to its step; the best checkpoint from
``best_model_checkpoint`` / ``best_metric`` of the newest state; the curves from ``log_history``.
``rng_state.pth`` is loaded by the Trainer with ``weights_only`` plus numpy's RNG classes and
``training_args.bin`` is never loaded on resume (``format.trust``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from aptbundle.format.manifest import BestInfo, CheckpointEntry
from aptbundle.ground.values import is_finite as finite
from aptbundle.layouts import Found, FrameworkPickle, fields, lacking

LAYOUT, TITLE = "hf-trainer", "Hugging Face Trainer"
_STATE = re.compile(r"^((?:[^/]+/)*?)(checkpoint-(\d+))/trainer_state\.json$")
MAX_STATE_BYTES = 64 << 20
_RESUME = {"optimizer": ("optimizer.",), "scheduler": ("scheduler.",), "rng": ("rng_state",)}


def _state(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_STATE_BYTES))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}


def recognise(root: Path, files: list[str]) -> Found | None:
    found = [(m.group(1) + m.group(2), m.group(2), int(m.group(3))) for rel in files if (m := _STATE.match(rel))]
    if not found:
        return None
    out = Found(LAYOUT, TITLE)
    newest: dict = {}
    for folder, name, n in sorted(found, key=lambda x: x[2]):
        st = _state(root / folder / "trainer_state.json")
        step = st.get("global_step") if type(st.get("global_step")) is int and st["global_step"] >= 0 else n
        epoch = st.get("epoch") if finite(st.get("epoch")) else 0
        log = [h for h in st.get("log_history", []) if isinstance(h, dict)] if isinstance(
            st.get("log_history"), list) else []
        metrics = {}
        for key, src in (("loss", "loss"), ("eval_loss", "eval_loss")):
            vals = [h[src] for h in log if finite(h.get(src)) and (type(h.get("step")) is not int or h["step"] <= step)]
            if vals:
                metrics[key] = vals[-1]
        out.checkpoints.append(CheckpointEntry(name, step, epoch, metrics,
                                               None if folder == f"checkpoints/{name}" else folder))
        inside = {rel[len(folder) + 1:] for rel in files if rel.startswith(folder + "/")}
        gone = lacking(inside, _RESUME)  # save_only_model=True saves the model and the state only
        if gone:
            out.missing[name] = gone
        newest = st or newest
    log = [h for h in newest.get("log_history", []) if isinstance(h, dict)] if isinstance(
        newest.get("log_history"), list) else []
    for key, src in (("loss", "loss"), ("val_loss", "eval_loss")):
        points = [[h["step"], h[src]] for h in log if type(h.get("step")) is int and finite(h.get(src))]
        if points:
            out.curves[key] = points
    best_path = newest.get("best_model_checkpoint")
    if isinstance(best_path, str) and finite(newest.get("best_metric")):
        name = best_path.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
        if any(c.name == name for c in out.checkpoints):
            metric, mode = _best_rule(root, [f for f in files if f.endswith("training_args.bin")])
            out.best = BestInfo(name, metric, mode, float(newest["best_metric"]))
    out.history.append({"framework": TITLE, "global_step": max(c.step for c in out.checkpoints),
                        "log_entries": len(log)})
    return out


def _best_rule(root: Path, args_files: list[str]) -> tuple[str, str]:
    """``metric_for_best_model`` and its direction, read from ``training_args.bin`` (a pickle
    aptbundle never loads: the scan engine reads it with every global inert, nothing is run), as
    the Trainer reads them: ``loss`` means ``eval_loss``, and a metric is maximised unless its name ends in loss."""
    for rel in sorted(args_files, key=lambda r: (r.count("/") == 0, r)):  # a checkpoint's, else the top one
        with FrameworkPickle(root / rel) as fp:
            args = fields(fp.data)
        metric = args.get("metric_for_best_model")
        if isinstance(metric, str) and metric:
            greater = args.get("greater_is_better")
            name = metric if metric.startswith("eval_") else f"eval_{metric}"
            up = greater if isinstance(greater, bool) else not name.endswith("loss")
            return name, "max" if up else "min"
    return "best_metric (metric_for_best_model)", "min"


def resume_call(run: str, checkpoint: CheckpointEntry | None) -> str:
    where = f"{run}/{checkpoint.folder}" if checkpoint else f"{run}/checkpoint-N"
    return f'trainer.train(resume_from_checkpoint="{where}")'

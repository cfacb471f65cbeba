"""PyTorch Lightning: ``.ckpt`` files, each one whole checkpoint (``epoch=E-step=S.ckpt``).

A checkpoint's step and epoch come from its name (Lightning's default ``{epoch}-{step}``
pattern, plus any ``metric=value`` it was asked to write); the best one from the
``ModelCheckpoint`` state inside the newest ``.ckpt`` (``best_model_path``, ``monitor``,
``mode``, ``best_model_score``), read by walking its pickle without running it. ``last.ckpt``
saved with ``save_last="link"`` is a link to a checkpoint: the manifest records it as such.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from aptbundle.format.manifest import BestInfo, CheckpointEntry
from aptbundle.ground.fsutil import read_capped
from aptbundle.ground.values import finite_number, is_finite as finite
from aptbundle.layouts import Found, FrameworkPickle, fields

LAYOUT, TITLE = "lightning", "PyTorch Lightning"
_RESUME = {"optimizer": "optimizer_states", "scheduler": "lr_schedulers", "loops": "loops"}
_MODE = re.compile(r"'mode': '(min|max)'")  # in ModelCheckpoint's state key
_PAIR = re.compile(r"([A-Za-z_][\w.]*)=(-?\d+(?:\.\d+)?(?:e-?\d+)?)")


def _entry(root: Path, rel: str, inside: dict) -> CheckpointEntry:
    stem = rel.rsplit("/", 1)[-1][:-len(".ckpt")]
    pairs = {k: v for k, raw in _PAIR.findall(stem) if (v := finite_number(float(raw))) is not None and abs(v) < 2 ** 53}
    if "step" not in pairs:  # last.ckpt saved as a copy, or a custom name: the counters inside
        pairs.setdefault("step", inside.get("global_step", 0))
        pairs.setdefault("epoch", inside.get("epoch", 0))
    step, epoch = int(pairs.pop("step", 0)), int(pairs.pop("epoch", 0))
    name = stem.replace("=", "-") or "checkpoint"
    return CheckpointEntry(name, step, epoch, {k: v for k, v in pairs.items() if finite(v)}, rel)


def checkpoint_state(path: Path) -> dict:
    """``best_model_path``, ``monitor``, ``mode``, ``best_model_score``, ``global_step`` and
    ``epoch`` recorded in a ``.ckpt``, read by the scan engine (nothing is run)."""
    with FrameworkPickle(path) as fp:
        top = fields(fp.data)
        out: dict = {k: v for k in ("global_step", "epoch") if type(v := top.get(k)) is int and 0 <= v < 2 ** 53}
        if top:  # save_weights_only=True writes neither optimizers, schedulers nor loop progress
            out["missing"] = [part for part, key in _RESUME.items() if key not in top]
            last = fields(fields(fields(top.get("loops")).get("fit_loop")).get("epoch_loop.batch_progress"))
            if isinstance(last.get("is_last_batch"), bool):
                out["mid_epoch"] = not last["is_last_batch"]
        for key, state in fields(top.get("callbacks")).items():
            state = fields(state)
            if not (isinstance(key, str) and key.startswith("ModelCheckpoint") and "best_model_path" in state):
                continue
            out.update({k: v for k in ("best_model_path", "monitor") if isinstance(v := state.get(k), str)})
            mode = _MODE.search(key)
            if mode:
                out["mode"] = mode.group(1)
            score = fp.scalar(state.get("best_model_score"))
            if score is not None:
                out["best_model_score"] = score
            break
        return out


def recognise(root: Path, files: list[str]) -> Found | None:
    ckpts = [rel for rel in files if rel.endswith(".ckpt")]
    if not ckpts:
        return None
    states = {rel: checkpoint_state(root / rel) for rel in ckpts}
    out = Found(LAYOUT, TITLE, [_entry(root, rel, states[rel]) for rel in ckpts])
    names = [c.name for c in out.checkpoints]
    if len(set(names)) != len(names):
        out.checkpoints = [CheckpointEntry(c.folder.replace("/", "_").replace("=", "-"), c.step, c.epoch, c.metrics,
                                           c.folder) for c in out.checkpoints]
    for c in out.checkpoints:
        if states[c.folder].get("missing"):
            out.missing[c.name] = states[c.folder]["missing"]
    mid = sorted(c.name for c in out.checkpoints if states[c.folder].get("mid_epoch"))
    if mid:
        out.notes["mid_epoch"] = mid
    points = _csv_losses(root, files)
    if points:  # CSVLogger's metrics.csv: the curve, and each checkpoint's loss at its step
        out.curves["loss"] = points
        for c in out.checkpoints:
            before = [v for s, v in points if s <= c.step]
            if before and "loss" not in c.metrics:
                c.metrics["loss"] = before[-1]
    newest = max(out.checkpoints, key=lambda c: (c.step, c.name))
    out.notes["last_step"] = newest.step
    st = states[newest.folder]
    best_name = str(st.get("best_model_path", "")).replace("\\", "/").rsplit("/", 1)[-1]
    best = next((c for c in out.checkpoints if c.folder.rsplit("/", 1)[-1] == best_name), None)
    if best is not None:
        monitor = st.get("monitor") if isinstance(st.get("monitor"), str) else "monitor"
        value = st.get("best_model_score", best.metrics.get(monitor))
        if finite(value):
            out.best = BestInfo(best.name, monitor, "max" if st.get("mode") == "max" else "min", float(value))
            best.metrics.setdefault(monitor, float(value))
    out.history.append({"framework": TITLE, "checkpoints": len(ckpts), "last_step": newest.step})
    return out


def resume_call(run: str, checkpoint: CheckpointEntry | None) -> str:
    where = f"{run}/{checkpoint.folder}" if checkpoint else f"{run}/checkpoints/last.ckpt"
    return f'trainer.fit(model, ckpt_path="{where}")'


_CSV = re.compile(r"(^|/)metrics\.csv$")
_LOSS_COLUMNS = ("train_loss", "loss", "train_loss_step", "train_loss_epoch")
MAX_CSV_BYTES = 16 << 20


def _csv_losses(root: Path, files: list[str]) -> list[list[float]]:
    """``[step, loss]`` of the newest CSVLogger ``metrics.csv`` that has a training loss column."""
    for rel in sorted((f for f in files if _CSV.search(f)), reverse=True):
        try:
            text = read_capped(root / rel, MAX_CSV_BYTES)[:MAX_CSV_BYTES].decode("utf-8", "replace")
            rows = list(csv.DictReader(io.StringIO(text)))
        except (OSError, csv.Error):
            continue
        column = next((c for c in _LOSS_COLUMNS if rows and c in rows[0]), None)
        points = []
        for row in rows if column else []:
            try:
                step, value = int(row.get("step") or ""), finite_number(float(row.get(column) or "nan"))
            except (TypeError, ValueError):
                continue
            if value is not None and 0 <= step < 2 ** 53:
                points.append([step, value])
        if points:
            return points
    return []

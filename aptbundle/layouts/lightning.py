"""PyTorch Lightning: ``.ckpt`` files, each one whole checkpoint (``epoch=E-step=S.ckpt``).

A checkpoint's step and epoch come from its name (Lightning's default ``{epoch}-{step}``
pattern, plus any ``metric=value`` it was asked to write); the best one from the
``ModelCheckpoint`` state inside the newest ``.ckpt`` (``best_model_path``, ``monitor``,
``mode``, ``best_model_score``), read by walking its pickle without running it. ``last.ckpt``
saved with ``save_last="link"`` is a link to a checkpoint: the manifest records it as such.
"""

from __future__ import annotations

import re
import struct
import zipfile
from pathlib import Path

from aptbundle.format.manifest import BestInfo, CheckpointEntry
from aptbundle.ground.values import finite_number, is_finite as finite
from aptbundle.layouts import Found, pickle_tokens, value_after

LAYOUT, TITLE = "lightning", "PyTorch Lightning"
_PAIR = re.compile(r"([A-Za-z_][\w.]*)=(-?\d+(?:\.\d+)?(?:e-?\d+)?)")


def _entry(root: Path, rel: str) -> CheckpointEntry:
    stem = rel.rsplit("/", 1)[-1][:-len(".ckpt")]
    pairs = {k: v for k, raw in _PAIR.findall(stem) if (v := finite_number(float(raw))) is not None and abs(v) < 2 ** 53}
    if "step" not in pairs:  # last.ckpt saved as a copy, or a custom name: the counters inside
        inside = checkpoint_state(root / rel)
        pairs.setdefault("step", inside.get("global_step", 0))
        pairs.setdefault("epoch", inside.get("epoch", 0))
    step, epoch = int(pairs.pop("step", 0)), int(pairs.pop("epoch", 0))
    name = stem.replace("=", "-") or "checkpoint"
    return CheckpointEntry(name, step, epoch, {k: v for k, v in pairs.items() if finite(v)}, rel)


def checkpoint_state(path: Path) -> dict:
    """``best_model_path``, ``monitor``, ``mode``, ``best_model_score``, ``global_step`` and
    ``epoch`` recorded in a ``.ckpt``, found by walking its pickle (nothing is run)."""
    tokens, z = pickle_tokens(path)
    if z is None:
        return {}
    with z:
        out = {k: v for k in ("best_model_path", "monitor", "mode") if isinstance(v := value_after(tokens, k), str)}
        out.update({k: v for k in ("global_step", "epoch") if type(v := value_after(tokens, k, ("int",))) is int})
        try:  # a 0-d tensor: ('storage', <class>, KEY, 'cpu', 1) after the key
            at = tokens.index(("str", "best_model_score"))
            keys = [v for kind, v in tokens[at + 1:at + 8] if kind == "str"]
            if len(keys) >= 2 and keys[0] == "storage":
                name = next((n for n in z.namelist() if n.endswith(f"/data/{keys[1]}")), None)
                raw = z.read(name)[:4] if name else b""
                if len(raw) == 4:
                    out["best_model_score"] = struct.unpack("<f", raw)[0]
        except (ValueError, KeyError, OSError, zipfile.BadZipFile):
            pass
        return out


def recognise(root: Path, files: list[str]) -> Found | None:
    ckpts = [rel for rel in files if rel.endswith(".ckpt")]
    if not ckpts:
        return None
    out = Found(LAYOUT, TITLE, [_entry(root, rel) for rel in ckpts])
    names = [c.name for c in out.checkpoints]
    if len(set(names)) != len(names):
        out.checkpoints = [CheckpointEntry(c.folder.replace("/", "_").replace("=", "-"), c.step, c.epoch, c.metrics,
                                           c.folder) for c in out.checkpoints]
    newest = max(out.checkpoints, key=lambda c: (c.step, c.name))
    st = checkpoint_state(root / newest.folder)
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

"""PyTorch Lightning: ``.ckpt`` files, each one whole checkpoint (``epoch=E-step=S.ckpt``).

A checkpoint's step and epoch come from its name (Lightning's default ``{epoch}-{step}``
pattern, plus any ``metric=value`` it was asked to write); the best one from the
``ModelCheckpoint`` state inside the newest ``.ckpt`` (``best_model_path``, ``monitor``,
``mode``, ``best_model_score``), read by walking its pickle without running it. ``last.ckpt``
saved with ``save_last="link"`` is a link to a checkpoint: the manifest records it as such.
"""

from __future__ import annotations

import pickletools
import re
import struct
import zipfile
from pathlib import Path

from aptbundle.format.manifest import BestInfo, CheckpointEntry
from aptbundle.layouts import Found, finite

LAYOUT, TITLE = "lightning", "PyTorch Lightning"
_PAIR = re.compile(r"([A-Za-z_][\w.]*)=(-?\d+(?:\.\d+)?(?:e-?\d+)?)")
MAX_PICKLE = 64 << 20
_STR = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}


def _entry(root: Path, rel: str) -> CheckpointEntry:
    stem = rel.rsplit("/", 1)[-1][:-len(".ckpt")]
    pairs = {k: float(v) for k, v in _PAIR.findall(stem)}
    if "step" not in pairs:  # last.ckpt saved as a copy, or a custom name: the counters inside
        inside = checkpoint_state(root / rel)
        pairs.setdefault("step", inside.get("global_step", 0))
        pairs.setdefault("epoch", inside.get("epoch", 0))
    step, epoch = int(pairs.pop("step", 0)), int(pairs.pop("epoch", 0))
    name = stem.replace("=", "-") or "checkpoint"
    return CheckpointEntry(name, step, epoch, {k: v for k, v in pairs.items() if finite(v)}, rel)


def checkpoint_state(path: Path) -> dict:
    """``best_model_path``, ``monitor``, ``mode`` and ``best_model_score`` of the ``ModelCheckpoint``
    state in a ``.ckpt``, found by walking its pickle (nothing is run); {} when not found."""
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None or z.getinfo(pkl).file_size > MAX_PICKLE:
                return {}
            data = z.read(pkl)
            prefix = pkl[:-len("data.pkl")]
            strings: list[str] = []
            memo: dict[int, object] = {}
            last: object = None
            out: dict = {}
            for op, arg, _pos in pickletools.genops(data):
                if op.name in ("BININT", "BININT1", "BININT2", "LONG1", "INT") and type(arg) is int and strings \
                        and strings[-1] in ("global_step", "epoch") and last == strings[-1]:
                    out.setdefault(strings[-1], arg)  # the top-level counters come first in a .ckpt
                if op.name in _STR:
                    last = arg
                    strings.append(arg if isinstance(arg, str) else "")
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[arg] = last
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = last
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    last = memo.get(arg)
                    if isinstance(last, str):
                        strings.append(last)
                else:
                    last = None
            for key in ("best_model_path", "monitor", "mode"):
                if key in strings:
                    i = strings.index(key)
                    if i + 1 < len(strings):
                        out[key] = strings[i + 1]
            if "best_model_score" in strings:  # a 0-d tensor: ('storage', <class>, KEY, 'cpu', 1)
                rest = strings[strings.index("best_model_score") + 1:]
                if len(rest) >= 2 and rest[0] == "storage":
                    raw = z.read(f"{prefix}data/{rest[1]}")[:8] if f"{prefix}data/{rest[1]}" in z.namelist() else b""
                    if len(raw) >= 4:
                        out["best_model_score"] = struct.unpack("<f", raw[:4])[0]
            return out
    except (OSError, zipfile.BadZipFile, ValueError, KeyError, struct.error, RecursionError):
        return {}


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

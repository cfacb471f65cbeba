"""The run's metrics log (``logs/metrics.jsonl``: one JSON object per logged step) as curves.

``read_curves`` turns the log into ``{"loss": [[step, value], ...], "val_loss": [...]}``,
skipping what is not a finite number (the log may come from anyone). ``summarize`` keeps at most
a few hundred points per curve (bucket means for the training loss, every point of the sparser
validation loss up to the cap): the checkpointer stores that summary in the manifest, so
``inspect`` of an archive draws the whole curve from the first member alone.
"""

from __future__ import annotations

import json
from typing import Any
from aptbundle.ground.values import finite_number

METRICS_FILE = "logs/metrics.jsonl"
CURVES = ("loss", "val_loss")
MAX_POINTS = 300
MAX_LINES = 10_000_000

Curves = dict[str, list[list[float]]]


def read_curves(data: bytes) -> Curves:
    """The loss curves of a metrics log; malformed lines are skipped."""
    out: Curves = {k: [] for k in CURVES}
    for i, line in enumerate(data.splitlines()):
        if i >= MAX_LINES:
            break
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(row, dict):
            continue
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 1 << 53:
            continue
        for key in CURVES:
            v = finite_number(row.get(key))
            if v is not None:
                out[key].append([step, v])
    return {k: v for k, v in out.items() if v}


def summarize(curves: Curves, points: int = MAX_POINTS) -> Curves:
    """At most ``points`` points per curve: bucket means of (step, value), in step order."""
    out: Curves = {}
    for key, pts in curves.items():
        if len(pts) <= points:
            out[key] = [[int(s), float(v)] for s, v in pts]
            continue
        size = len(pts) / points
        out[key] = []
        for b in range(points):
            chunk = pts[int(b * size):int((b + 1) * size)] or pts[int(b * size):int(b * size) + 1]
            out[key].append([int(chunk[-1][0]), sum(v for _, v in chunk) / len(chunk)])
    return out


def checked_curves(raw: Any) -> Curves:
    """Curves as a manifest records them, kept only where well formed (it may come from anyone)."""
    if not isinstance(raw, dict):
        return {}
    out: Curves = {}
    for key in CURVES:
        pts = raw.get(key)
        if not isinstance(pts, list) or len(pts) > 10 * MAX_POINTS:
            continue
        good = [[p[0], float(p[1])] for p in pts if isinstance(p, list) and len(p) == 2 and type(p[0]) is int
                and finite_number(p[1]) is not None]
        if good:
            out[key] = good
    return out

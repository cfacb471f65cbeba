"""``inspect --plot FILE.png|.svg``: the loss curves drawn with matplotlib (the ``plot`` extra).

Written under a temporary name and renamed into place, like every file aptbundle writes.
"""

from __future__ import annotations

import os
from pathlib import Path

from aptbundle.ground import temporaries
from aptbundle.ground.errors import AptBundleError

FORMATS = (".png", ".svg")


def plot_curves(curves: dict[str, list[list[float]]], title: str, out: str | Path) -> Path:
    """Draw ``curves`` (``{"loss": [[step, value], ...], ...}``) into ``out``; return its path."""
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise AptBundleError(f"{out}: --plot writes a .png or .svg file; name it e.g. loss.png")
    if not out.parent.is_dir():
        raise AptBundleError(f"{out}: the folder {out.parent} does not exist; create it or choose another path")
    if not any(curves.values()):
        raise AptBundleError(f"{title}: no loss recorded yet; nothing to plot")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AptBundleError("--plot needs matplotlib: pip install 'aptbundle[plot]'") from None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    styles = {"loss": dict(linewidth=1.2), "val_loss": dict(marker="o", markersize=3, linewidth=1.5)}
    for key, pts in curves.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key.replace("_", " "), **styles.get(key, {}))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    tmp = temporaries.temp_path(out.parent, out.name)
    try:
        fig.savefig(tmp, format=out.suffix.lower()[1:], bbox_inches="tight")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        temporaries.remove_path(tmp)
    return out

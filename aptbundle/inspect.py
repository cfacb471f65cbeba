"""``inspect``: what a run or an archive holds, read from its manifest alone.

For an archive only the first member (the manifest) is decompressed, so inspecting a run of
many GB takes milliseconds. ``describe`` gives a JSON-ready dict; ``render`` the text a person
reads, with a small plot of the loss across checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from aptbundle.run import Run

_SPARK = "▁▂▃▄▅▆▇█"


def describe(path: str | Path) -> dict:
    """Everything ``inspect`` shows, as plain data.

    >>> # describe("run1.aptrun.tar.zst")["checkpoints"][-1]["step"]
    """
    p = Path(path)
    archive_size = None
    requires = None
    if "://" not in str(path) and p.is_dir():
        man = Run.open(p).manifest
        kind = "run"
    else:
        from aptbundle.archive import read_archive_manifest

        man, archive_size, requires = read_archive_manifest(path, with_requires=True)
        kind = "archive"
    best = man.best.name if man.best else None
    return {
        "path": str(path),
        "kind": kind,
        "name": man.name,
        "digest": man.digest(),
        "run_id": man.run_id,
        "trainer": man.trainer,
        "created_at": man.created_at,
        "updated_at": man.updated_at,
        "environment": man.environment,
        "history": man.history,
        "files": len(man.files),
        "size": man.total_size(),
        "archive_size": archive_size,
        "needs_aptbundle": requires is not None,  # a --dense archive: plain tar gives grouped bytes
        "codec": requires,
        "latest": man.latest,
        "best": (man.best.__dict__ if man.best else None),
        "checkpoints": [
            {"name": c.name, "step": c.step, "epoch": c.epoch, "loss": c.metrics.get("loss"),
             "metrics": c.metrics, "latest": c.name == man.latest, "best": c.name == best,
             "size": sum(f.size for f in man.files if f.path.startswith(c.folder + "/"))}
            for c in man.checkpoints
        ],
    }


def sparkline(values: list[float]) -> str:
    """One character per value, low to high: ``sparkline([3, 2, 1]) == '█▄▁'``."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(_SPARK[min(len(_SPARK) - 1, int((v - lo) / span * (len(_SPARK) - 1) + 0.5))] for v in values)


def _size(n: int) -> str:
    from aptbundle.cli import human

    return human(n)


def render(info: dict) -> str:
    """The human-readable report for ``describe``'s dict."""
    env = info["environment"]
    lines = [
        f"{info['kind']} {info['path']}",
        f"  name      {info['name']}",
        f"  digest    {info['digest']}",
        f"  trainer   {info['trainer'] or '(none: not resumable by aptbundle)'}",
        f"  files     {info['files']} ({_size(info['size'])} of data"
        + (f", archive {_size(info['archive_size'])})" if info["archive_size"] is not None else ")"),
        *([f"  codec     {info['codec']}: unpack it with aptbundle (plain tar would give byte-grouped"
            " tensor files)"] if info.get("needs_aptbundle") else []),
        f"  written   {info['updated_at']} on " + ", ".join(f"{k} {v}" for k, v in sorted(env.items())),
    ]
    if info["history"]:
        lines.append("  history")
        for h in info["history"]:
            lines.append(f"    {h.get('started_at', '?')}  steps {h.get('start_step', '?')} -> {h.get('stop_step', '?')}"
                         f"  on {h.get('device', '?')}, torch {h.get('torch', '?')}")
    if info["checkpoints"]:
        lines.append("  checkpoints")
        lines.append(f"    {'name':<16}{'step':>8}{'epoch':>8}{'loss':>10}{'size':>11}")
        for c in info["checkpoints"]:
            loss = f"{c['loss']:.4f}" if isinstance(c["loss"], (int, float)) else "-"
            tags = " ".join(t for t, on in (("latest", c["latest"]), ("best", c["best"])) if on)
            lines.append(f"    {c['name']:<16}{c['step']:>8}{c['epoch']:>8}{loss:>10}{_size(c['size']):>11}  {tags}")
        losses = [c["loss"] for c in info["checkpoints"] if isinstance(c["loss"], (int, float))]
        if len(losses) >= 2:
            lines.append(f"  loss      {sparkline(losses)}  {losses[0]:.4f} -> {losses[-1]:.4f}")
    else:
        lines.append("  checkpoints  (none)")
    return "\n".join(lines)

"""How results look to a person: sizes, the ``inspect`` report with its loss plot.

``overview.describe`` gives the data; ``render`` turns it into the text ``inspect`` prints.
"""

from __future__ import annotations

_SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """One character per value, low to high: ``sparkline([3, 2, 1]) == '█▄▁'``."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(_SPARK[min(len(_SPARK) - 1, int((v - lo) / span * (len(_SPARK) - 1) + 0.5))] for v in values)


def human(n: int) -> str:
    """Bytes as 1.2 MB.

    >>> human(1234567)
    '1.2 MB'
    """
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"




def render(info: dict) -> str:
    """The human-readable report for ``describe``'s dict."""
    env = info["environment"]
    lines = [
        f"{info['kind']} {info['path']}",
        f"  name      {info['name']}",
        f"  digest    {info['digest']}",
        f"  trainer   {info['trainer'] or '(none: not resumable by aptbundle)'}",
        f"  files     {info['files']} ({human(info['size'])} of data"
        + (f", archive {human(info['archive_size'])})" if info["archive_size"] is not None else ")"),
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
            lines.append(f"    {c['name']:<16}{c['step']:>8}{c['epoch']:>8}{loss:>10}{human(c['size']):>11}  {tags}")
        losses = [c["loss"] for c in info["checkpoints"] if isinstance(c["loss"], (int, float))]
        if len(losses) >= 2:
            lines.append(f"  loss      {sparkline(losses)}  {losses[0]:.4f} -> {losses[-1]:.4f}")
    else:
        lines.append("  checkpoints  (none)")
    return "\n".join(lines)

"""How results look to a person: sizes, the ``inspect`` report, and the loss chart.

``overview.describe`` gives the data; ``render`` turns it into the text ``inspect`` prints.
Every string that comes from a bundle is escaped first: a manifest may come from anyone, and a
terminal obeys the control sequences it is sent.
"""

from __future__ import annotations

import math
import unicodedata

from aptbundle.layouts import missing_text

_SPARK = "▁▂▃▄▅▆▇█"
_MARKS = {"loss": "•", "val_loss": "×"}


def escaped(value) -> str:
    """``value`` as text safe to print: control, format (bidi, zero-width) characters escaped.

    >>> escaped("run\\x1b]0;owned\\x07")
    'run\\\\x1b]0;owned\\\\x07'
    """
    text = str(value)
    return "".join(ch if unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp") else
                   ch.encode("unicode_escape").decode("ascii") for ch in text)


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


def chart(curves: dict[str, list[list[float]]], width: int = 64, height: int = 12) -> list[str]:
    """A terminal chart of the loss curves: y axis labelled, steps below, one mark per series.

    >>> len(chart({"loss": [[1, 3.0], [2, 2.0], [3, 1.0]]}))
    15
    """
    series = {k: v for k, v in curves.items() if v}
    if not series:
        return []
    xs = [p[0] for pts in series.values() for p in pts]
    ys = [p[1] for pts in series.values() for p in pts if math.isfinite(p[1])]
    if not ys:
        return []
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    xspan, yspan = (x1 - x0) or 1, (y1 - y0) or 1.0
    grid = [[" "] * width for _ in range(height)]
    for key, pts in series.items():
        mark = _MARKS.get(key, "·")
        cols: dict[int, list[float]] = {}
        for x, y in pts:
            cols.setdefault(round((x - x0) / xspan * (width - 1)), []).append(y)
        for col, vals in cols.items():
            row = round((y1 - sum(vals) / len(vals)) / yspan * (height - 1))
            grid[row][col] = mark
    label = [f"{y1:.3f}" if r == 0 else f"{y0:.3f}" if r == height - 1 else
             f"{(y1 + y0) / 2:.3f}" if r == (height - 1) // 2 else "" for r in range(height)]
    pad = max(len(s) for s in label)
    lines = [f"{label[r]:>{pad}} ┤{''.join(grid[r])}" for r in range(height)]
    lines.append(" " * pad + " └" + "─" * width)
    lines.append(" " * pad + f"  step {x0}" + f"step {x1}".rjust(width - len(f"step {x0}") - 1))
    legend = "   ".join(f"{_MARKS.get(k, '·')} {k} {pts[0][1]:.4f} -> {pts[-1][1]:.4f}" for k, pts in series.items())
    lines.append(" " * pad + "  " + legend)
    return lines


def _history(info: dict) -> list[str]:
    hist = [h for h in info["history"] if isinstance(h, dict)]
    if not hist:
        return []
    out = ["  history"]
    for i, h in enumerate(hist):
        if "framework" in h:  # an adopted folder: what its framework recorded
            facts = ", ".join(f"{escaped(k).replace('_', ' ')} {escaped(v)}" for k, v in h.items() if k != "framework")
            out.append(f"    written by {escaped(h['framework'])}" + (f": {facts}" if facts else ""))
            continue
        if "updated_at" in h and "added" in h:  # init --update
            out.append(f"    {escaped(h['updated_at'])}  updated: +{escaped(h.get('added'))} -{escaped(h.get('removed'))}"
                       f" ~{escaped(h.get('changed'))} files")
            continue
        start = h.get("from_digest")
        end = next((n.get("from_digest") for n in hist[i + 1:] if n.get("from_digest")), info["digest"])
        change = f"  digest {escaped(start)[:12]} -> {escaped(end)[:12]}" if isinstance(start, str) else ""
        out.append(f"    {escaped(h.get('started_at', '?'))}  steps {escaped(h.get('start_step', '?'))} ->"
                   f" {escaped(h.get('stop_step', '?'))}  on {escaped(h.get('device', '?'))},"
                   f" torch {escaped(h.get('torch', '?'))}{change}")
    return out


def note_lines(untrusted: list[str], machine_paths: dict[str, str], most: int = 8,
               hidden: list[str] | None = None, framework: dict | None = None) -> list[str]:
    """The notes of a run, each said once: its untrusted files (one line, counted), the files with
    machine paths (Lightning's checkpoints in one line that says what a move changes), the
    pickles the ignore rules keep out of the scan, and what the framework's records say
    (``framework``: the manifest's ``framework_notes``)."""
    from aptbundle.format.trust import UNTRUSTED_NOTE

    out = []
    if untrusted:
        names = sorted({u.rsplit("/", 1)[-1] for u in untrusted})
        where = f" ({', '.join(escaped(n) for n in names[:3])}{' ...' if len(names) > 3 else ''})" \
            if len(untrusted) > 1 else f" ({escaped(untrusted[0])})"
        out.append(f"note: {len(untrusted)} file(s) carried untrusted{where}: {UNTRUSTED_NOTE}")
    ckpts = sorted(p for p in machine_paths if p.endswith(".ckpt"))
    others = {k: v for k, v in machine_paths.items() if k not in ckpts}
    if ckpts:
        last = (framework or {}).get("last_step")
        at = f" step {last}" if type(last) is int else " its last step"
        out.append(f"warning: {len(ckpts)} checkpoint(s): PyTorch Lightning records absolute paths of the folder it wrote"
                   f" to ({escaped(machine_paths[ckpts[0]][:120])}): resumed anywhere else, ModelCheckpoint no longer"
                   f" recognises its own files, so it keeps every checkpoint it saves (no top-k pruning) and"
                   f" last.ckpt stays at{at} while new saves go to last-v1.ckpt. Resume at the original path to keep"
                   " that bookkeeping, or prune old checkpoints yourself")
    mid = (framework or {}).get("mid_epoch")
    if isinstance(mid, list) and mid and all(isinstance(m, str) for m in mid):
        out.append(f"note: {', '.join(escaped(m) for m in mid[:most])}{' ...' if len(mid) > most else ''}: saved"
                   " mid-epoch; Lightning itself does not resume those exactly (the epoch's data order and"
                   " position start again)")
    for path, found in list(others.items())[:most]:
        out.append(f"warning: {escaped(path)} records absolute paths of the machine that wrote it: {escaped(found)}")
    if len(others) > most:
        out.append(f"warning: ... and {len(others) - most} more files with machine paths")
    if hidden:
        more = f" and {len(hidden) - most} more" if len(hidden) > most else ""
        out.append(f"warning: {', '.join(escaped(h) for h in hidden[:most])}{more}: pickle or torch file(s) that"
                   " .aptignore keeps out of the scan and the run; never checked, do not load them unchecked")
    return out


SHOWN_CHECKPOINTS = 20


def render(info: dict) -> str:
    """The human-readable report for ``describe``'s dict."""
    env = info["environment"] if isinstance(info["environment"], dict) else {}
    best = info.get("best")
    lines = [
        f"{info['kind']} {escaped(info['path'])}",
        f"  name      {escaped(info['name'])}",
        f"  digest    {info['digest']}",
        *([f"  signed    {escaped(info['signed_by'])} (not checked: verify --trust KEY.pub checks it)"]
          if info.get("signed_by") else []),
        (f"  trainer   {escaped(info['trainer'])} (`aptbundle resume` continues it)" if info["trainer"] else
         f"  framework {escaped(info['framework'])}: the framework resumes it (`aptbundle resume` prints its call)"
         if info.get("framework") else "  trainer   none (aptbundle verifies and moves it; the code that wrote it"
         " continues it)"),
        f"  files     {info['files']} ({human(info['size'])} of data"
        + (f", archive {human(info['archive_size'])})" if info["archive_size"] is not None else ")"),
        *([f"  codec     {info['codec']}: unpack it with aptbundle (plain tar would give byte-grouped"
            " tensor files)"] if info.get("needs_aptbundle") else []),
        f"  written   {escaped(info['updated_at'])} on " + ", ".join(f"{escaped(k)} {escaped(v)}" for k, v in sorted(env.items())),
        *([f"  best      {escaped(best['name'])} by {escaped(best['metric'])} ({escaped(best['mode'])})"] if best else []),
    ]
    lines += _history(info)
    lines += [f"  link      {escaped(x['path'])} -> {escaped(x['target'])}" for x in info.get("links", [])]
    if info["checkpoints"]:
        lines.append("  checkpoints")
        lines.append(f"    {'name':<16}{'step':>8}{'epoch':>8}{'loss':>10}{'val_loss':>10}{'size':>11}")
        for c in info["checkpoints"]:
            loss = f"{c['loss']:.4f}" if isinstance(c["loss"], (int, float)) else "-"
            val = c["metrics"].get("val_loss", c["metrics"].get("eval_loss")) if isinstance(c["metrics"], dict) else None
            val = f"{val:.4f}" if isinstance(val, (int, float)) else "-"
            tags = " ".join(t for t, on in (("latest", c["latest"]), ("best", c["best"])) if on)
            if not c.get("resumable", True):
                tags += f"  weights only (no {escaped(missing_text(c.get('missing', [])))})"
            lines.append(f"    {escaped(c['name']):<16}{c['step']:>8}{escaped(c['epoch']):>8}{loss:>10}{val:>10}"
                         f"{human(c['size']):>11}  {tags}")
    else:
        lines.append("  checkpoints  (none)")
    plot = chart(info.get("curves") or {})
    if plot:
        lines.append("  loss")
        lines += ["    " + line for line in plot]
    for key, what in (("unlisted_checkpoints", "on disk, not in the manifest"), ("gone_checkpoints", "in the manifest,"
                      " gone from disk")):
        for name in info.get(key, [])[:SHOWN_CHECKPOINTS]:
            lines.append(f"  moved on  {escaped(name)}: {what}; `aptbundle init --update {escaped(info['path'])}`"
                         " takes it in")
    lines += note_lines(info.get("untrusted", []), info.get("machine_paths", {}),
                        framework=info.get("framework_notes") or {})
    return "\n".join(lines)


def render_diff(d: dict) -> str:
    """The human-readable report of ``overview.diff``."""
    a, b = d["a"], d["b"]
    lines = [f"a  {escaped(a['path'])}  ({escaped(a['name'])}, digest {a['digest'][:12]})",
             f"b  {escaped(b['path'])}  ({escaped(b['name'])}, digest {b['digest'][:12]})"]
    if d["same"]:
        return "\n".join(lines + ["the same run: identical manifests"])
    if d["config"]:
        lines.append("config")
        lines += [f"  {escaped(k)}: {escaped(va)} -> {escaped(vb)}" for k, (va, vb) in d["config"].items()]
    files = d["files"]
    lines.append(f"files     {len(files['only_a'])} only in a, {len(files['only_b'])} only in b,"
                 f" {len(files['changed'])} changed")
    lines += [f"  - {escaped(p)}" for p in files["only_a"][:20]] + [f"  + {escaped(p)}" for p in files["only_b"][:20]]
    lines += [f"  ~ {escaped(p)}" for p in files["changed"][:20]]
    ck = d["checkpoints"]
    lines.append(f"checkpoints  both: {len(ck['both'])}; only a: {', '.join(map(escaped, ck['only_a'])) or '-'};"
                 f" only b: {', '.join(map(escaped, ck['only_b'])) or '-'}")
    for side in ("a", "b"):
        f = d["final"][side]
        if f:
            metrics = ", ".join(f"{escaped(k)} {v:.4f}" if isinstance(v, float) else f"{escaped(k)} {escaped(v)}"
                                for k, v in f.items() if k not in ("checkpoint",))
            lines.append(f"final {side}  {escaped(f['checkpoint'])}: {metrics}")
    return "\n".join(lines)


def table(head: str, items: list[dict], label, line) -> list[str]:
    """A header and one line per item (``line(item)``); an item with an ``error`` shows it after
    ``label(item)`` instead."""
    return [head] + [f"{label(r)}error: {escaped(r['error'])}" if "error" in r else line(r) for r in items]

"""What the command line's commands share: options, JSON or text output, the notes of a check."""

from __future__ import annotations

import json

import click

from aptbundle.commands.exits import plain
from aptbundle.commands.render import note_lines
from aptbundle.ground.problems import Kind


def emit(as_json: bool, data: dict, text: str) -> None:
    """Print ``data`` as JSON with --json, else the human text."""
    if as_json:
        click.echo(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False))
    else:
        click.echo(text)


def digest_opt(ctx, param, value: str | None) -> str | None:
    """Click callback for an expected run digest: an empty or malformed one is misuse, never "no
    check"."""
    if value is None:
        return None
    v = value.strip().lower()
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise click.BadParameter(f"{value!r} is not a run digest (64 hex digits, as `aptbundle pack` prints)")
    return v


def size_opt(ctx, param, value: str | None) -> int | None:
    """Click callback for a size limit: ``20G``, ``500M``, ``1.5T`` or a number of bytes."""
    if value is None:
        return None
    text = value.strip().upper().removesuffix("B")
    scale = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}.get(text[-1:], 1)
    try:
        number = float(text[:-1] if scale > 1 else text)
    except ValueError:
        number = -1
    if not 0 <= number < 1e18:
        raise click.BadParameter(f"{value!r} is not a size; write it like 20G, 500M or 1000000")
    return int(number * scale)


json_opt = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
trust_opt = click.option("--trust", multiple=True, type=click.Path(dir_okay=False),
                         help="Public key file (KEY.pub); refuse anything not signed by one of these. Repeatable.")
sign_opt = click.option("--sign", type=click.Path(dir_okay=False),
                        help="Sign the run's digest with this private key (from `aptbundle keygen`).")
quiet_opt = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
strict_opt = click.option("--strict", is_flag=True,
                          help="Refuse files carried as untrusted (ones no framework loads, like training_args.bin).")
force_opt = click.option("--force", is_flag=True,
                         help="If DEST/NAME may not be replaced (another run, a newer state, files of yours),"
                              " move it aside to NAME.old-TIME instead of refusing; it is never deleted.")


def print_notes(notes: list, framework: dict | None = None) -> None:
    """The notes of a check on stderr (with --json they are also listed on stdout): one line for
    the untrusted files, one per file with machine paths."""
    if not notes:
        return
    untrusted = sorted({n.path for n in notes if n.kind == Kind.UNTRUSTED})
    paths = {n.path: n.found for n in notes if n.kind == Kind.MACHINE_PATH}
    hidden = sorted({n.path for n in notes if n.kind == Kind.HIDDEN})
    for line in note_lines(untrusted, paths, hidden=hidden, framework=framework):
        click.echo(plain(line), err=True)


"""The ``aptbundle`` command line: parse, call the library, print. No logic lives here.

Errors a user can cause become one line on stderr and exit status 1; misuse of flags is exit
status 2 (click's own). ``--json`` prints machine-readable output on stdout; progress goes to
stderr and only when it is a terminal and ``--quiet`` is not given.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Callable, Iterator

import click

from aptbundle.errors import AptBundleError, VerifyError


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VerifyError as e:
            for p in e.problems:
                click.echo(f"error: {p}", err=True)
            click.echo(f"error: {e.args[0].split(':')[0]}: {len(e.problems)} problem(s)", err=True)
            ctx.exit(1)
        except AptBundleError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)
        except OSError as e:  # disk full, permission denied, ...: the user's environment, not a bug
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            click.echo(f"error: {where}{e.strerror or e}; check the path, free space and permissions", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@contextlib.contextmanager
def progress(total: int, label: str, quiet: bool) -> Iterator[Callable[[int], None] | None]:
    """A byte-counting progress bar on stderr, or None when quiet or stderr is not a terminal."""
    if quiet or not sys.stderr.isatty() or total <= 0:
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=False,
                           show_percent=True, show_eta=True) as bar:
        yield bar.update


def emit(as_json: bool, data: dict, text: str) -> None:
    """Print ``data`` as JSON with --json, else the human text."""
    if as_json:
        click.echo(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False))
    else:
        click.echo(text)


def human(n: int) -> str:
    """Bytes as 1.2 MB."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


json_opt = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
quiet_opt = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aptbundle")
def main() -> None:
    """Make training runs portable: pack, unpack, verify, inspect and resume them."""


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--trainer", default=None, help="Registered trainer that can resume this run.")
@json_opt
@quiet_opt
def init(directory: str, trainer: str | None, as_json: bool, quiet: bool) -> None:
    """Adopt an existing training output folder by writing its aptrun.json."""
    from aptbundle.run import adopt, walk_files

    from pathlib import Path

    total = 0
    if Path(directory).is_dir():
        total = sum((Path(directory) / f).stat().st_size for f in walk_files(Path(directory))[0])
    with progress(total, "hashing", quiet) as cb:
        run = adopt(directory, trainer=trainer, progress=cb)
    m = run.manifest
    emit(as_json, {"path": str(run.path), "name": m.name, "files": len(m.files), "size": m.total_size(),
                   "checkpoints": [c.name for c in m.checkpoints], "digest": m.digest()},
         f"adopted {run.path}: {len(m.files)} files, {human(m.total_size())},"
         f" {len(m.checkpoints)} checkpoint(s); digest {m.digest()}")


@main.command()
@click.argument("path", type=click.Path())
@json_opt
@quiet_opt
def verify(path: str, as_json: bool, quiet: bool) -> None:
    """Check a run directory or an archive against its manifest (exit 1 on any problem)."""
    from aptbundle.verify import verify_path

    report = verify_path(path, quiet_progress=lambda total, label: progress(total, label, quiet))
    if as_json:
        emit(True, report.to_dict(), "")
    else:
        for p in report.problems:
            click.echo(f"error: {p}", err=True)
        if report.ok:
            click.echo(f"ok: {path}: {report.files} files, {human(report.size)} intact; digest {report.digest}")
        else:
            click.echo(f"error: {path}: {len(report.problems)} problem(s)", err=True)
    if not report.ok:
        sys.exit(1)

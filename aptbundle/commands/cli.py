"""The ``aptbundle`` command line: parse, call the library, print. No logic lives here.

Exit statuses follow ``exits``: 0 done, 1 failed (one line per problem on stderr), 2 misuse,
130 interrupted. ``--json`` prints machine-readable output on stdout; progress goes to stderr
and only when it is a terminal and ``--quiet`` is not given.
"""

from __future__ import annotations

import json
import sys

import click

from aptbundle.commands.exits import CONTEXT, Group
from aptbundle.commands.progress import progress
from aptbundle.commands.render import human, render


def emit(as_json: bool, data: dict, text: str) -> None:
    """Print ``data`` as JSON with --json, else the human text."""
    if as_json:
        click.echo(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False))
    else:
        click.echo(text)


json_opt = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
quiet_opt = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")


@click.group(cls=Group, context_settings=CONTEXT)
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
    from aptbundle.format.adopt import adopt

    with progress("hashing", quiet) as cb:
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
    from aptbundle.commands.overview import verify_path

    with progress("verifying", quiet) as cb:
        report = verify_path(path, cb)
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


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("-o", "--output", default=None, type=click.Path(),
              help="Archive path or folder (default: ./NAME.aptrun.tar.zst).")
@click.option("--level", default=None, type=click.IntRange(1, 22), help="zstd level [default: 3; 1 with --dense].")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0, 256),
              help="zstd worker threads (0: one per core).")
@click.option("--checkpoints", "which", default="all", show_default=True,
              type=click.Choice(["all", "latest", "best"]), help="Which checkpoints to pack.")
@click.option("--dense", is_flag=True,
              help="Byte-group float tensors before zstd: smaller, but only aptbundle can unpack it.")
@json_opt
@quiet_opt
def pack(run_dir: str, output: str | None, level: int | None, threads: int, which: str, dense: bool, as_json: bool,
         quiet: bool) -> None:
    """Pack a run into one verified NAME.aptrun.tar.zst."""
    from aptbundle.archive.writer import pack as do_pack

    with progress("packing", quiet) as cb:
        res = do_pack(run_dir, output, level=level, threads=threads, checkpoints=which, progress=cb, dense=dense)
    ratio = res.size / res.data_size if res.data_size else 0.0
    emit(as_json, {"archive": str(res.path), "size": res.size, "digest": res.digest, "files": res.files,
                   "data_size": res.data_size},
         f"{res.path}\n  {human(res.size)} ({res.files} files, {human(res.data_size)} of data, ratio {ratio:.2f})"
         f"\n  digest {res.digest}")


@main.command()
@click.argument("archive", type=click.Path())
@click.option("-C", "--dest", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Folder to create NAME/ in.")
@click.option("--expect-digest", default=None, help="Refuse the archive unless its run digest is this.")
@json_opt
@quiet_opt
def unpack(archive: str, dest: str, expect_digest: str | None, as_json: bool, quiet: bool) -> None:
    """Unpack an archive into DEST/NAME, verifying every byte before it appears."""
    from aptbundle.archive.extract import unpack as do_unpack

    with progress("unpacking", quiet) as cb:
        path = do_unpack(archive, dest, expect_digest=expect_digest, progress=cb)
    emit(as_json, {"path": str(path)}, str(path))


@main.command()
@click.argument("path", type=click.Path())
@json_opt
def inspect(path: str, as_json: bool) -> None:
    """Show a run's or an archive's manifest: checkpoints, history, sizes, a loss plot."""
    from aptbundle.commands.overview import describe

    info = describe(path)
    emit(as_json, info, render(info))


@main.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--from", "which", default="latest", show_default=True, help="latest, best or a checkpoint name.")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Train to N epochs in total.")
@click.option("--stop-at-step", type=click.IntRange(1), default=None, help="Save and stop after global step N.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--data", type=click.Path(dir_okay=False), default=None, help="The corpus, when it did not travel.")
@click.option("--allow-data-change", is_flag=True, help="Continue even if the data differs from the run's.")
@json_opt
@quiet_opt
def resume(run_dir: str | None, which: str, epochs: int | None, stop_at_step: int | None, device: str,
           data: str | None, allow_data_change: bool, as_json: bool, quiet: bool) -> None:
    """Continue a run where it stopped (default: the run here or in ./outputs)."""
    from aptbundle.commands.resume import resume as do_resume

    res = do_resume(run_dir, which=which, epochs=epochs, stop_at_step=stop_at_step, device=device, data=data,
                    allow_data_change=allow_data_change, quiet=quiet)
    step = getattr(res, "global_step", None)
    done = getattr(res, "finished", None)
    where = getattr(res, "run_dir", run_dir)
    emit(as_json, {"run": str(where), "global_step": step, "finished": done,
                   "checkpoint": getattr(res, "last_checkpoint", None)},
         f"{'finished' if done else 'stopped'} at step {step}: {where}")

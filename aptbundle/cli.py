"""The ``aptbundle`` command line: parse, call the library, print. No logic lives here.

Errors a user can cause become one line on stderr and exit status 1; misuse of flags is exit
status 2 (click's own). ``--json`` prints machine-readable output on stdout; progress goes to
stderr and only when it is a terminal and ``--quiet`` is not given.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Iterator

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


class Bar:
    """A byte-counting progress bar on stderr; its total may be learnt late (``set_total``)."""

    def __init__(self, label: str, total: int = 0):
        self.label, self.total, self._bar = label, total, None

    def set_total(self, total: int) -> None:
        self.total = total

    def __call__(self, n: int) -> None:
        if self._bar is None:
            self._bar = click.progressbar(length=max(self.total, 1), label=self.label, file=sys.stderr,
                                          show_pos=False, show_percent=True, show_eta=True)
            self._bar.__enter__()
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


@contextlib.contextmanager
def progress(label: str, quiet: bool) -> Iterator[Bar | None]:
    """A progress bar, or None when ``--quiet`` is given or stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    bar = Bar(label)
    try:
        yield bar
    finally:
        bar.close()


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
    from aptbundle.run import adopt

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
    from aptbundle.verify import verify_path

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
    from aptbundle.archive import pack as do_pack

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
    from aptbundle.archive import unpack as do_unpack

    with progress("unpacking", quiet) as cb:
        path = do_unpack(archive, dest, expect_digest=expect_digest, progress=cb)
    emit(as_json, {"path": str(path)}, str(path))


@main.command()
@click.argument("path", type=click.Path())
@json_opt
def inspect(path: str, as_json: bool) -> None:
    """Show a run's or an archive's manifest: checkpoints, history, sizes, a loss plot."""
    from aptbundle.inspect import describe, render

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
    from aptbundle.resume import resume as do_resume

    res = do_resume(run_dir, which=which, epochs=epochs, stop_at_step=stop_at_step, device=device, data=data,
                    allow_data_change=allow_data_change, quiet=quiet)
    step = getattr(res, "global_step", None)
    done = getattr(res, "finished", None)
    where = getattr(res, "run_dir", run_dir)
    emit(as_json, {"run": str(where), "global_step": step, "finished": done,
                   "checkpoint": getattr(res, "last_checkpoint", None)},
         f"{'finished' if done else 'stopped'} at step {step}: {where}")

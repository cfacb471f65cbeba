"""The ``aptbundle`` command line: parse, call the library, print. No logic lives here.

Exit statuses follow ``exits``: 0 done, 1 failed (one line per problem on stderr), 2 misuse,
130 interrupted. ``--json`` prints machine-readable output on stdout; progress goes to stderr
and only when it is a terminal and ``--quiet`` is not given.
"""

from __future__ import annotations

import sys

import click

from aptbundle.commands import cli_store
from aptbundle.commands.exits import CONTEXT, SHOWN, CommandGroup, plain, status_for
from aptbundle.commands.options import (digest_opt, emit, force_opt, json_opt, print_notes, quiet_opt, sign_opt,
                                        size_opt, strict_opt, trust_opt)
from aptbundle.commands.progress import progress
from aptbundle.commands.render import escaped, human, render, render_diff


@click.group(cls=CommandGroup, context_settings=CONTEXT)
@click.version_option(package_name="aptbundle")
def main() -> None:
    """Make training runs portable: pack, unpack, verify, inspect and resume them; push them to and
    pull them from a store."""


@main.command(short_help="Adopt a training output folder (write its manifest), or update it.")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--update", is_flag=True, help="Take in what changed in an adopted folder: new checkpoints and"
              " files, deleted ones, changed ones (what init does anyway on a folder with a manifest).")
@click.option("--trainer", default=None, help="Registered trainer that can resume this run.")
@strict_opt
@json_opt
@quiet_opt
def init(directory: str, update: bool, trainer: str | None, strict: bool, as_json: bool, quiet: bool) -> None:
    """Adopt an existing training output folder by writing its aptrun.json: a Hugging Face Trainer,
    accelerate, Lightning or DCP output, a save_pretrained folder, or any folder of files.

    On a folder that already has a manifest, bring it up to date with the folder (what --update
    says explicitly) and say what changed: `aptbundle init DIR` is safe to run again and again.
    An .aptignore file in the folder (gitignore rules) names what should never travel."""
    from aptbundle.format.run import Run
    from aptbundle.layouts import missing_text, title, weights_only
    from aptbundle.layouts.adopt import adopt
    from aptbundle.layouts.adopt import update as do_update

    notes: list = []
    if Run.is_run(directory):
        with progress("hashing", quiet) as cb:
            ch = do_update(directory, progress=cb, strict=strict, notes=notes)
        lines = [f"+ {escaped(p)}" for p in ch.added] + [f"- {escaped(p)}" for p in ch.removed] + \
                [f"~ {escaped(p)}" for p in ch.changed]
        summary = (f"updated {escaped(directory)}: {len(ch.added)} new, {len(ch.removed)} gone, {len(ch.changed)} changed"
                   f" file(s); checkpoints +[{', '.join(ch.checkpoints_added)}] -[{', '.join(ch.checkpoints_removed)}];"
                   f" digest {ch.digest}") if ch.any else f"{escaped(directory)}: nothing changed; digest {ch.digest}"
        print_notes(notes)
        emit(as_json, {**ch.to_dict(), "path": directory, "notes": [n.to_dict() for n in notes]},
             "\n".join(lines[:SHOWN] + [summary]))
        return
    with progress("hashing", quiet) as cb:
        run = adopt(directory, trainer=trainer, progress=cb, strict=strict, notes=notes)
    m = run.manifest
    notes_of = m.extra.get("framework_notes") if isinstance(m.extra.get("framework_notes"), dict) else {}
    print_notes(notes, notes_of)
    what = title(m.layout)
    lacks = weights_only(m)
    rows = [f"  {escaped(c.name):<24} step {c.step:>8}  epoch {escaped(c.epoch):>6}"
            + "".join(f"  {escaped(k)} {v:.4g}" for k, v in c.metrics.items() if isinstance(v, (int, float)))
            + ("  latest" if c.name == m.latest else "") + ("  best" if m.best and c.name == m.best.name else "")
            + (f"  weights only (no {missing_text(lacks[c.name])}): not resumable" if c.name in lacks else "")
            for c in m.checkpoints]
    emit(as_json, {"path": str(run.path), "name": m.name, "files": len(m.files), "size": m.total_size(),
                   "layout": m.layout, "checkpoints": [c.name for c in m.checkpoints],
                   "checkpoint_info": [{"name": c.name, "step": c.step, "epoch": c.epoch, "metrics": c.metrics,
                                        "resumable": c.name not in lacks, "missing": lacks.get(c.name, [])}
                                       for c in m.checkpoints],
                   "latest": m.latest, "best": m.best.name if m.best else None, "untrusted": m.untrusted,
                   "links": [x.path for x in m.links], "digest": m.digest(), "notes": [n.to_dict() for n in notes]},
         f"adopted {run.path}" + (f" ({what})" if what else "") + f": {len(m.files)} files, {human(m.total_size())},"
         f" {len(m.checkpoints)} checkpoint(s)" + (f", best {escaped(m.best.name)}" if m.best else "")
         + f"; digest {m.digest()}" + "".join("\n" + row for row in rows[:SHOWN]))


@main.command(short_help="Check a run or an archive against its manifest.")
@click.argument("path", type=click.Path())
@trust_opt
@strict_opt
@json_opt
@quiet_opt
def verify(path: str, trust: tuple[str, ...], strict: bool, as_json: bool, quiet: bool) -> None:
    """Check a run directory or an archive against its manifest (exit 1 on any problem).

    With --trust, it must also be signed, in its present state, by one of the given keys."""
    from aptbundle.commands.overview import verify_path

    with progress("verifying", quiet) as cb:
        report = verify_path(path, cb, trust=list(trust), strict=strict)
    print_notes(report.notes)
    if as_json:
        emit(True, report.to_dict(), "")
    else:
        for p in report.problems[:SHOWN]:
            click.echo(f"error: {plain(escaped(p))}", err=True)
        if len(report.problems) > SHOWN:
            click.echo(f"error: ... and {len(report.problems) - SHOWN} more (--json lists every one)", err=True)
        if report.ok:
            click.echo(f"ok: {path}: {report.files} files, {human(report.size)} intact; digest {report.digest}")
        else:
            click.echo(f"error: {path}: {len(report.problems)} problem(s)", err=True)
    if not report.ok:
        sys.exit(1)


@main.command(short_help="Pack a run into one verified NAME.aptrun.tar.zst.")
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
@click.option("--dry-run", is_flag=True, help="Say what would go in, and its size; write nothing.")
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
@sign_opt
@json_opt
@quiet_opt
def pack(run_dir: str, output: str | None, level: int | None, threads: int, which: str, dense: bool,
         dry_run: bool, force: bool, sign: str | None, as_json: bool, quiet: bool) -> None:
    """Pack a run into one verified NAME.aptrun.tar.zst."""
    from aptbundle.archive.writer import pack as do_pack
    from aptbundle.archive.writer import plan

    if dry_run:
        info = plan(run_dir, output, checkpoints=which)
        lines = [f"{human(f['size']):>10}  {escaped(f['path'])}" for f in info["files"]]
        emit(as_json, info, "\n".join(lines + [f"would pack {len(info['files'])} files, {human(info['data_size'])}"
                                                f" of data, into {escaped(info['archive'])} (nothing written)"]))
        return

    with progress("packing", quiet) as cb:
        res = do_pack(run_dir, output, level=level, threads=threads, checkpoints=which, progress=cb, dense=dense,
                      force=force, sign=sign)
    ratio = res.size / res.data_size if res.data_size else 0.0
    emit(as_json, {"archive": str(res.path), "size": res.size, "digest": res.digest, "files": res.files,
                   "data_size": res.data_size, "signed": sign is not None},
         f"{res.path}\n  {human(res.size)} ({res.files} files, {human(res.data_size)} of data, ratio {ratio:.2f})"
         f"\n  digest {res.digest}" + (f"\n  signed with {escaped(sign)}" if sign else ""))


@main.command(short_help="Unpack an archive into DEST/NAME, verified.")
@click.argument("archive", type=click.Path())
@click.option("-C", "--dest", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Folder to create NAME/ in.")
@click.option("--expect-digest", default=None, callback=digest_opt,
              help="Refuse the archive unless its run digest is this (64 hex digits).")
@click.option("--max-size", default=None, callback=size_opt,
              help="Refuse an archive that declares more data than this (e.g. 20G, 500M).")
@trust_opt
@strict_opt
@json_opt
@quiet_opt
def unpack(archive: str, dest: str, expect_digest: str | None, max_size: int | None, trust: tuple[str, ...],
           strict: bool, as_json: bool, quiet: bool) -> None:
    """Unpack an archive into DEST/NAME, verifying every byte before it appears."""
    from aptbundle.archive.extract import unpack as do_unpack

    notes: list = []
    with progress("unpacking", quiet) as cb:
        path = do_unpack(archive, dest, expect_digest=expect_digest, progress=cb, max_size=max_size,
                         trust=list(trust), strict=strict, notes=notes)
    print_notes(notes)
    emit(as_json, {"path": str(path), "notes": [n.to_dict() for n in notes]}, str(path))


@main.command(short_help="Show a run or archive: checkpoints, history, loss chart.")
@click.argument("path", type=click.Path())
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False),
              help="Also draw the loss curves into FILE.png or FILE.svg (needs aptbundle[plot]).")
@json_opt
def inspect(path: str, plot_file: str | None, as_json: bool) -> None:
    """Show a run's or an archive's manifest: checkpoints, history, sizes, and the loss curves
    (training and validation) of its metrics log as a chart."""
    from aptbundle.commands.overview import describe

    info = describe(path)
    if plot_file:
        from aptbundle.commands.plot import plot_curves

        info["plot"] = str(plot_curves(info["curves"], info["name"], plot_file))
    emit(as_json, info, render(info) + (f"\n  plot      {escaped(info['plot'])}" if plot_file else ""))


@main.command(name="ls", short_help="List the runs and archives under a folder, or in a store.")
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@json_opt
def ls_(directory: str, as_json: bool) -> None:
    """List the runs and archives under DIRECTORY (default: here): steps, best loss, size, digest.

    For a store (a folder `aptbundle push` wrote, or a URL): its runs, digests, checkpoints and
    sizes."""
    from aptbundle.commands.overview import is_store, list_runs

    if is_store(directory):
        cli_store.ls_store(directory, as_json)
        return
    runs = list_runs(directory)
    rows = [f"{'name':<20}{'kind':<9}{'steps':>7}{'best loss':>11}{'size':>11}  {'digest':<14}path"]
    for r in runs:
        if r["kind"] == "unreadable":
            rows.append(f"{'?':<20}{'error':<9}{'':>7}{'':>11}{'':>11}  {'':<14}{escaped(r['path'])}: {escaped(r['error'])}")
            continue
        loss = f"{r['best_loss']:.4f}" if r["best_loss"] is not None else "-"
        rows.append(f"{escaped(r['name']):<20}{r['kind']:<9}{r['steps']:>7}{loss:>11}{human(r['size']):>11}"
                    f"  {r['digest'][:12]:<14}{escaped(r['path'])}"
                    + ("  (latest checkpoint: weights only)" if not r.get("resumable", True) else ""))
    emit(as_json, {"runs": runs}, "\n".join(rows) if runs else f"no runs or archives under {escaped(directory)}")


@main.command(short_help="Compare two runs or archives.")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@json_opt
def diff(a: str, b: str, as_json: bool) -> None:
    """Compare two runs or archives: config, files, checkpoints and final metrics."""
    from aptbundle.commands.overview import diff as do_diff

    d = do_diff(a, b)
    emit(as_json, d, render_diff(d))


@main.command(short_help="Delete all but the last K checkpoints of a run.")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--keep-last", type=click.IntRange(1), required=True,
              help="Checkpoints to keep (the latest and the best are always kept).")
@click.option("--dry-run", is_flag=True, help="Say what would go; delete nothing.")
@json_opt
def prune(run_dir: str, keep_last: int, dry_run: bool, as_json: bool) -> None:
    """Delete all but the last K checkpoints of a run, in one commit (latest and best stay)."""
    from aptbundle.format.run import prune as do_prune

    names, size = do_prune(run_dir, keep_last, dry_run=dry_run)
    verb = "would prune" if dry_run else "pruned"
    emit(as_json, {"run": run_dir, "pruned": names, "bytes": size, "dry_run": dry_run},
         f"{verb} {len(names)} checkpoint(s), {human(size)}: {', '.join(names) or 'none'}")


@main.command(short_help="Continue a run where it stopped (also from a store).")
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--from", "which", default="latest", show_default=True,
              help="latest, best or a checkpoint name; or STORE/NAME to pull the run out of a store first.")
@click.option("--checkpoint", default=None, help="With --from STORE/NAME: latest, best or a checkpoint name.")
@click.option("-C", "--dest", default=".", show_default=True, type=click.Path(file_okay=False),
              help="With --from STORE/NAME: the folder to pull NAME/ into.")
@trust_opt
@force_opt
@click.option("--weights-only", is_flag=True, help="For a run another framework wrote: print its resume call even"
              " when the checkpoint holds weights only (what is missing starts afresh).")
@click.option("--backup-to", default=None, help="Push the run to this store after each checkpoint (in the"
              " background) and at the end.")
@click.option("--epochs", type=click.IntRange(1), default=None,
              help="Train to N epochs in total, and keep that as the plan [default: the run's plan].")
@click.option("--stop-at-step", type=click.IntRange(1), default=None, help="Save and stop after global step N.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to train (auto: a GPU if there is one).")
@click.option("--data", type=click.Path(dir_okay=False), default=None, help="The corpus, when it did not travel.")
@click.option("--allow-data-change", is_flag=True, help="Continue even if the data differs from the run's.")
@json_opt
@quiet_opt
def resume(run_dir: str | None, which: str, checkpoint: str | None, dest: str, trust: tuple[str, ...], force: bool,
           weights_only: bool, backup_to: str | None, epochs: int | None, stop_at_step: int | None, device: str, data: str | None,
           allow_data_change: bool, as_json: bool, quiet: bool) -> None:
    """Continue a run where it stopped (default: the run here or in ./outputs).

    `--from STORE/NAME` first pulls run NAME out of the store (into -C DEST, updating an older
    copy there), verified, then continues it: the way back after losing the training machine."""
    from aptbundle.commands.resume import ResumeRequest, resume as do_resume

    if "/" in which:
        if run_dir is not None:
            raise click.UsageError("give either RUN_DIR or --from STORE/NAME, not both")
        from aptbundle.store.backup import split_ref
        from aptbundle.store.pull import pull as do_pull

        store, name = split_ref(which)
        with progress("pulling", quiet, rate=True) as cb:
            # what resuming needs: the chosen checkpoint and the run's own files
            pulled = do_pull(store, name, dest, trust=list(trust), progress=cb, force=force,
                             checkpoints=checkpoint or "latest")
        if not quiet:
            click.echo(f"pulled {escaped(name)} from {escaped(store)} into {escaped(pulled.path)}"
                       f" ({pulled.fetched_files} file(s) fetched, {pulled.reused_files} reused)"
                       + (f"; the copy that was in the way is now {escaped(pulled.moved_aside)}"
                          if pulled.moved_aside else ""), err=True)
        run_dir, which = pulled.path, "latest"
    elif trust or checkpoint or force:
        raise click.UsageError("--trust, --checkpoint and --force go with --from STORE/NAME; for a local run use"
                               " --from CHECKPOINT and `aptbundle verify --trust`")
    res = do_resume(run_dir, ResumeRequest(which=which, epochs=epochs, stop_at_step=stop_at_step, device=device,
                                           data=data, allow_data_change=allow_data_change, quiet=quiet,
                                           backup_to=backup_to, weights_only=weights_only))
    emit(as_json, {"run": str(res.run_dir), "global_step": res.global_step, "finished": res.finished,
                   "checkpoint": res.last_checkpoint},
         f"{'finished' if res.finished else 'stopped'} at step {res.global_step}: {res.run_dir}")
    if res.stopped_by:
        sys.exit(status_for(res.stopped_by))


for _command in (cli_store.keygen, cli_store.push, cli_store.pull, cli_store.log, cli_store.forget, cli_store.gc,
                 cli_store.check, cli_store.store):
    main.add_command(_command)

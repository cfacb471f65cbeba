"""The ``aptbundle`` command line: parse, call the library, print. No logic lives here.

Exit statuses follow ``exits``: 0 done, 1 failed (one line per problem on stderr), 2 misuse,
130 interrupted. ``--json`` prints machine-readable output on stdout; progress goes to stderr
and only when it is a terminal and ``--quiet`` is not given.
"""

from __future__ import annotations

import json
import sys

import click

from aptbundle.commands.exits import CONTEXT, SHOWN, Group, plain, status_for
from aptbundle.commands.progress import progress
from aptbundle.commands.render import human, render, render_diff, shown


def emit(as_json: bool, data: dict, text: str) -> None:
    """Print ``data`` as JSON with --json, else the human text."""
    if as_json:
        click.echo(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False))
    else:
        click.echo(text)


def _digest(value: str | None) -> str | None:
    """An expected run digest must be one: an empty or malformed one is misuse, never "no check"."""
    if value is None:
        return None
    v = value.strip().lower()
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise click.BadParameter(f"{value!r} is not a run digest (64 hex digits, as `aptbundle pack` prints)")
    return v


def _size(value: str | None) -> int | None:
    """``20G``, ``500M``, ``1.5T`` or a number of bytes."""
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


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(package_name="aptbundle")
def main() -> None:
    """Make training runs portable: pack, unpack, verify, inspect and resume them; push them to and
    pull them from a store."""


@main.command(short_help="Adopt a training output folder (write its manifest).")
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


@main.command(short_help="Check a run or an archive against its manifest.")
@click.argument("path", type=click.Path())
@trust_opt
@json_opt
@quiet_opt
def verify(path: str, trust: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Check a run directory or an archive against its manifest (exit 1 on any problem).

    With --trust, it must also be signed, in its present state, by one of the given keys."""
    from aptbundle.commands.overview import verify_path

    with progress("verifying", quiet) as cb:
        report = verify_path(path, cb, trust=list(trust))
    if as_json:
        emit(True, report.to_dict(), "")
    else:
        for p in report.problems[:SHOWN]:
            click.echo(f"error: {plain(shown(p))}", err=True)
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
        lines = [f"{human(f['size']):>10}  {shown(f['path'])}" for f in info["files"]]
        emit(as_json, info, "\n".join(lines + [f"would pack {len(info['files'])} files, {human(info['data_size'])}"
                                                f" of data, into {shown(info['archive'])} (nothing written)"]))
        return

    with progress("packing", quiet) as cb:
        res = do_pack(run_dir, output, level=level, threads=threads, checkpoints=which, progress=cb, dense=dense,
                      force=force, sign=sign)
    ratio = res.size / res.data_size if res.data_size else 0.0
    emit(as_json, {"archive": str(res.path), "size": res.size, "digest": res.digest, "files": res.files,
                   "data_size": res.data_size, "signed": sign is not None},
         f"{res.path}\n  {human(res.size)} ({res.files} files, {human(res.data_size)} of data, ratio {ratio:.2f})"
         f"\n  digest {res.digest}" + (f"\n  signed with {shown(sign)}" if sign else ""))


@main.command(short_help="Unpack an archive into DEST/NAME, verified.")
@click.argument("archive", type=click.Path())
@click.option("-C", "--dest", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Folder to create NAME/ in.")
@click.option("--expect-digest", default=None, callback=lambda ctx, param, v: _digest(v),
              help="Refuse the archive unless its run digest is this (64 hex digits).")
@click.option("--max-size", default=None, callback=lambda ctx, param, v: _size(v),
              help="Refuse an archive that declares more data than this (e.g. 20G, 500M).")
@trust_opt
@json_opt
@quiet_opt
def unpack(archive: str, dest: str, expect_digest: str | None, max_size: int | None, trust: tuple[str, ...],
           as_json: bool, quiet: bool) -> None:
    """Unpack an archive into DEST/NAME, verifying every byte before it appears."""
    from aptbundle.archive.extract import unpack as do_unpack

    with progress("unpacking", quiet) as cb:
        path = do_unpack(archive, dest, expect_digest=expect_digest, progress=cb, max_size=max_size,
                         trust=list(trust))
    emit(as_json, {"path": str(path)}, str(path))


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
    emit(as_json, info, render(info) + (f"\n  plot      {shown(info['plot'])}" if plot_file else ""))


@main.command(name="ls", short_help="List the runs and archives under a folder, or in a store.")
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@json_opt
def ls_(directory: str, as_json: bool) -> None:
    """List the runs and archives under DIRECTORY (default: here): steps, best loss, size, digest.

    For a store (a folder `aptbundle push` wrote, or a URL): its runs, digests, checkpoints and
    sizes."""
    from aptbundle.commands.overview import is_store, list_runs

    if is_store(directory):
        _ls_store(directory, as_json)
        return
    runs = list_runs(directory)
    rows = [f"{'name':<20}{'kind':<9}{'steps':>7}{'best loss':>11}{'size':>11}  {'digest':<14}path"]
    for r in runs:
        if r["kind"] == "unreadable":
            rows.append(f"{'?':<20}{'error':<9}{'':>7}{'':>11}{'':>11}  {'':<14}{shown(r['path'])}: {shown(r['error'])}")
            continue
        loss = f"{r['best_loss']:.4f}" if r["best_loss"] is not None else "-"
        rows.append(f"{shown(r['name']):<20}{r['kind']:<9}{r['steps']:>7}{loss:>11}{human(r['size']):>11}"
                    f"  {r['digest'][:12]:<14}{shown(r['path'])}")
    emit(as_json, {"runs": runs}, "\n".join(rows) if runs else f"no runs or archives under {shown(directory)}")


def _ls_store(store: str, as_json: bool) -> None:
    from aptbundle.store.maintain import list_store

    runs = list_store(store)
    rows = [f"{'name':<20}{'steps':>7}{'ckpts':>6}{'size':>11}{'stored':>11}  {'digest':<14}{'signed':<7}pushed"]
    for r in runs:
        if "error" in r:
            rows.append(f"{shown(r['name']):<20}error: {shown(r['error'])}")
            continue
        rows.append(f"{shown(r['name']):<20}{r['step']:>7}{len(r['checkpoints']):>6}{human(r['size']):>11}"
                    f"{human(r['stored_size']):>11}  {r['digest'][:12]:<14}{'yes' if r['signed'] else 'no':<7}"
                    f"{r['pushed_at']}" + (f"  ({r['missing_blobs']} blob(s) missing)" if r["missing_blobs"] else ""))
    emit(as_json, {"store": store, "runs": runs}, "\n".join(rows) if runs else f"no runs in the store {shown(store)}")


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


@main.command(short_help="Make an Ed25519 key pair for signing runs.")
@click.argument("key", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace KEY and KEY.pub if they exist.")
@json_opt
def keygen(key: str, force: bool, as_json: bool) -> None:
    """Write a new key pair: KEY (private, mode 0600: keep it secret) and KEY.pub (give it to
    whoever should trust your runs: `unpack/pull/verify --trust KEY.pub`)."""
    from aptbundle.format.signature import keygen as do_keygen

    priv, pub, keyid = do_keygen(key, force=force)
    emit(as_json, {"private_key": str(priv), "public_key": str(pub), "keyid": keyid},
         f"private key {shown(str(priv))} (keep it secret)\npublic key  {shown(str(pub))}\nkey id      {keyid}")


@main.command(short_help="Push a run into a store; only new files travel.")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("store")
@click.option("--checkpoints", "which", default="all", show_default=True,
              type=click.Choice(["all", "latest", "best"]), help="Which checkpoints to push.")
@click.option("--dense", is_flag=True, help="Byte-group float tensors before zstd (smaller blobs).")
@click.option("--level", default=None, type=click.IntRange(1, 22), help="zstd level [default: 3; 1 with --dense].")
@sign_opt
@json_opt
@quiet_opt
def push(run_dir: str, store: str, which: str, dense: bool, level: int | None, sign: str | None, as_json: bool,
         quiet: bool) -> None:
    """Push RUN_DIR into STORE (a folder or a URL such as s3://bucket/runs), as STORE/NAME.

    Files the store already has (by SHA-256) are not sent again; the run appears in the store
    only once all of its files are there."""
    from aptbundle.store.push import push as do_push

    with progress("pushing", quiet, rate=True) as cb:
        r = do_push(run_dir, store, sign=sign, dense=dense, level=level, checkpoints=which, progress=cb)
    emit(as_json, r.to_dict(),
         f"pushed {shown(r.name)} to {shown(r.store)}: {r.sent_files} file(s) sent ({human(r.data_bytes)} as"
         f" {human(r.sent_bytes)}), {r.present_files} already there ({human(r.present_bytes)}) in {r.seconds:.1f} s"
         f"\n  digest {r.digest}" + ("  (signed)" if r.signed else "")
         + f"\n  pull it with: aptbundle pull {shown(r.store)} {shown(r.name)}")


@main.command(short_help="Pull a run out of a store into DEST/NAME, verified.")
@click.argument("store")
@click.argument("name")
@click.option("-C", "--dest", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Folder to create NAME/ in (an older version there is updated).")
@click.option("--digest", default=None, callback=lambda ctx, param, v: _digest(v),
              help="Pull the version with this run digest, not the newest (64 hex digits).")
@click.option("--max-size", default=None, callback=lambda ctx, param, v: _size(v),
              help="Refuse a run that declares more new data than this (e.g. 20G, 500M).")
@trust_opt
@json_opt
@quiet_opt
def pull(store: str, name: str, dest: str, digest: str | None, max_size: int | None, trust: tuple[str, ...],
         as_json: bool, quiet: bool) -> None:
    """Pull run NAME out of STORE into DEST/NAME, checking every byte before it appears.

    If DEST/NAME holds an older version of the run, only the files it lacks are fetched."""
    from aptbundle.store.pull import pull as do_pull

    with progress("pulling", quiet, rate=True) as cb:
        r = do_pull(store, name, dest, digest=digest, trust=list(trust), progress=cb, max_size=max_size)
    emit(as_json, r.to_dict(),
         f"{r.path}\n  {r.fetched_files} file(s) fetched ({human(r.fetched_bytes)}), {r.reused_files} reused from the"
         f" older version ({human(r.reused_bytes)}) in {r.seconds:.1f} s\n  digest {r.digest}"
         + (f"  (signed by {r.signed_by[:16]})" if r.signed_by else ""))


@main.command(short_help="Delete what no run in a store references.")
@click.argument("store")
@click.option("--grace", default=3600.0, show_default=True, type=click.FloatRange(0),
              help="Keep unreferenced objects younger than this many seconds.")
@click.option("--dry-run", is_flag=True, help="Say what would go; delete nothing.")
@json_opt
def gc(store: str, grace: float, dry_run: bool, as_json: bool) -> None:
    """Delete blobs and manifests of STORE that no run's ref reaches (safe while pushes run)."""
    from aptbundle.store.maintain import gc as do_gc

    r = do_gc(store, grace_s=grace, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    emit(as_json, r.to_dict(),
         f"{verb} {r.deleted_blobs} blob(s) and {r.deleted_manifests} manifest(s), {human(r.deleted_bytes)};"
         f" kept {r.kept_blobs} blob(s) in use and {r.kept_young} younger than {grace:g} s")


@main.command(short_help="Continue a run where it stopped (also from a store).")
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--from", "which", default="latest", show_default=True,
              help="latest, best or a checkpoint name; or STORE/NAME to pull the run out of a store first.")
@click.option("--checkpoint", default=None, help="With --from STORE/NAME: latest, best or a checkpoint name.")
@click.option("-C", "--dest", default=".", show_default=True, type=click.Path(file_okay=False),
              help="With --from STORE/NAME: the folder to pull NAME/ into.")
@trust_opt
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
def resume(run_dir: str | None, which: str, checkpoint: str | None, dest: str, trust: tuple[str, ...],
           backup_to: str | None, epochs: int | None, stop_at_step: int | None, device: str, data: str | None,
           allow_data_change: bool, as_json: bool, quiet: bool) -> None:
    """Continue a run where it stopped (default: the run here or in ./outputs).

    `--from STORE/NAME` first pulls run NAME out of the store (into -C DEST, updating an older
    copy there), verified, then continues it: the way back after losing the training machine."""
    from aptbundle.commands.resume import resume as do_resume

    if "/" in which:
        if run_dir is not None:
            raise click.UsageError("give either RUN_DIR or --from STORE/NAME, not both")
        from aptbundle.store.backup import split_ref
        from aptbundle.store.pull import pull as do_pull

        store, name = split_ref(which)
        with progress("pulling", quiet, rate=True) as cb:
            pulled = do_pull(store, name, dest, trust=list(trust), progress=cb)
        if not quiet:
            click.echo(f"pulled {shown(name)} from {shown(store)} into {shown(pulled.path)}"
                       f" ({pulled.fetched_files} file(s) fetched, {pulled.reused_files} reused)", err=True)
        run_dir, which = pulled.path, checkpoint or "latest"
    elif trust or checkpoint:
        raise click.UsageError("--trust and --checkpoint go with --from STORE/NAME; for a local run use --from"
                               " CHECKPOINT and `aptbundle verify --trust`")
    extra = {"backup_to": backup_to} if backup_to else {}
    res = do_resume(run_dir, which=which, epochs=epochs, stop_at_step=stop_at_step, device=device, data=data,
                    allow_data_change=allow_data_change, quiet=quiet, **extra)
    step = getattr(res, "global_step", None)
    done = getattr(res, "finished", None)
    where = getattr(res, "run_dir", run_dir)
    emit(as_json, {"run": str(where), "global_step": step, "finished": done,
                   "checkpoint": getattr(res, "last_checkpoint", None)},
         f"{'finished' if done else 'stopped'} at step {step}: {where}")
    stopped_by = getattr(res, "stopped_by", None)
    if stopped_by:
        sys.exit(status_for(stopped_by))

"""The store's commands: ``keygen``, ``push``, ``pull``, ``gc``, and ``ls`` of a store."""

from __future__ import annotations

import click

from aptbundle.commands.options import (digest_opt, emit, force_opt, json_opt, quiet_opt, sign_opt, size_opt,
                                        strict_opt, trust_opt)
from aptbundle.commands.progress import progress
from aptbundle.commands.render import human, escaped


def ls_store(store: str, as_json: bool) -> None:
    from aptbundle.store.maintain import list_store

    runs = list_store(store)
    rows = [f"{'name':<20}{'steps':>7}{'ckpts':>6}{'size':>11}{'stored':>11}  {'digest':<14}{'signed':<7}"
            f"{'pushed':<22}written by"]
    for r in runs:
        if "error" in r:
            rows.append(f"{escaped(r['name']):<20}error: {escaped(r['error'])}")
            continue
        rows.append(f"{escaped(r['name']):<20}{r['step']:>7}{len(r['checkpoints']):>6}{human(r['size']):>11}"
                    f"{human(r['stored_size']):>11}  {r['digest'][:12]:<14}{'yes' if r['signed'] else 'no':<7}"
                    f"{r['pushed_at']:<22}{escaped(r.get('framework') or r.get('trainer') or '-')}"
                    + (f", best {escaped(r['best'])}" if r.get("best") else "")
                    + (f"  ({r['missing_blobs']} blob(s) missing)" if r["missing_blobs"] else ""))
    emit(as_json, {"store": store, "runs": runs}, "\n".join(rows) if runs else f"no runs in the store {escaped(store)}")


@click.command(short_help="Make an Ed25519 key pair for signing runs.")
@click.argument("key", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace KEY and KEY.pub if they exist.")
@json_opt
def keygen(key: str, force: bool, as_json: bool) -> None:
    """Write a new key pair: KEY (private, mode 0600: keep it secret) and KEY.pub (give it to
    whoever should trust your runs: `unpack/pull/verify --trust KEY.pub`)."""
    from aptbundle.format.signature import keygen as do_keygen

    priv, pub, keyid = do_keygen(key, force=force)
    emit(as_json, {"private_key": str(priv), "public_key": str(pub), "keyid": keyid},
         f"private key {escaped(str(priv))} (keep it secret)\npublic key  {escaped(str(pub))}\nkey id      {keyid}")


@click.command(short_help="Push a run into a store; only new files travel.")
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
    for w in r.warnings:
        click.echo(escaped(w), err=True)
    emit(as_json, r.to_dict(),
         f"pushed {escaped(r.name)} to {escaped(r.store)}: {r.sent_files} file(s) sent ({human(r.data_bytes)} as"
         f" {human(r.sent_bytes)}), {r.present_files} already there ({human(r.present_bytes)}) in {r.seconds:.1f} s"
         f"\n  digest {r.digest}" + ("  (signed)" if r.signed else "")
         + f"\n  pull it with: aptbundle pull {escaped(r.store)} {escaped(r.name)}")


@click.command(short_help="Pull a run out of a store into DEST/NAME, verified.")
@click.argument("store")
@click.argument("name")
@click.option("-C", "--dest", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Folder to create NAME/ in (an older version there is updated).")
@click.option("--digest", default=None, callback=digest_opt,
              help="Pull the version with this run digest, not the newest (64 hex digits).")
@click.option("--max-size", default=None, callback=size_opt,
              help="Refuse a run that declares more new data than this (e.g. 20G, 500M).")
@trust_opt
@strict_opt
@force_opt
@json_opt
@quiet_opt
def pull(store: str, name: str, dest: str, digest: str | None, max_size: int | None, trust: tuple[str, ...],
         strict: bool, force: bool, as_json: bool, quiet: bool) -> None:
    """Pull run NAME out of STORE into DEST/NAME, checking every byte before it appears.

    If DEST/NAME holds an older version of the run, only the files it lacks are fetched. Anything
    else there (another run, a newer state, files its manifest does not list) is never replaced:
    the pull is refused, or with --force that copy is moved aside."""
    from aptbundle.store.pull import pull as do_pull

    with progress("pulling", quiet, rate=True) as cb:
        r = do_pull(store, name, dest, digest=digest, trust=list(trust), progress=cb, max_size=max_size,
                    strict=strict, force=force)
    emit(as_json, r.to_dict(), pulled_text(r))


def pulled_text(r) -> str:
    """What a pull did, for people."""
    return (f"{escaped(r.path)}\n  {r.fetched_files} file(s) fetched ({human(r.fetched_bytes)}), {r.reused_files}"
            f" reused from the older version ({human(r.reused_bytes)}) in {r.seconds:.1f} s\n  digest {r.digest}"
            + (f"  (signed by {r.signed_by[:16]})" if r.signed_by else "")
            + (f"\n  the copy that was in the way is now {escaped(r.moved_aside)}" if r.moved_aside else ""))


@click.command(short_help="Delete what no run in a store references.")
@click.argument("store")
@click.option("--grace", default=3600.0, show_default=True, type=click.FloatRange(0),
              help="Keep unreferenced objects younger than this many seconds.")
@click.option("--dry-run", is_flag=True, help="Say what would go; delete nothing.")
@json_opt
def gc(store: str, grace: float, dry_run: bool, as_json: bool) -> None:
    """Delete blobs and manifests of STORE that no run's ref reaches (safe while pushes run)."""
    from aptbundle.store.maintain import gc as do_gc

    r = do_gc(store, grace_s=grace, dry_run=dry_run)
    for w in r.warnings:
        click.echo(escaped(w), err=True)
    verb = "would delete" if dry_run else "deleted"
    emit(as_json, r.to_dict(),
         f"{verb} {r.deleted_blobs} blob(s) and {r.deleted_manifests} manifest(s), {human(r.deleted_bytes)};"
         f" kept {r.kept_blobs} blob(s) in use and {r.kept_young} younger than {grace:g} s")

"""The store's commands: ``keygen``, ``push``, ``pull``, ``log``, ``forget``, ``gc``, ``check``,
``store upgrade``, and ``ls`` of a store."""

from __future__ import annotations

import click

from aptbundle.commands.options import (digest_opt, emit, force_opt, json_opt, quiet_opt, sign_opt, size_opt,
                                        strict_opt, trust_opt)
from aptbundle.commands.progress import progress
from aptbundle.commands.render import escaped, human, table


def ls_store(store: str, as_json: bool) -> None:
    from aptbundle.store.maintain import list_store

    runs = list_store(store)
    rows = table(
        f"{'name':<20}{'steps':>7}{'ckpts':>6}{'size':>11}{'stored':>11}  {'digest':<14}{'signed':<7}"
        f"{'pushed':<22}written by", runs, lambda r: f"{escaped(r['name']):<20}",
        lambda r: f"{escaped(r['name']):<20}{r['step']:>7}{len(r['checkpoints']):>6}{human(r['size']):>11}"
                  f"{human(r['stored_size']):>11}  {r['digest'][:12]:<14}{'yes' if r['signed'] else 'no':<7}"
                  f"{r['pushed_at']:<22}{escaped(r.get('framework') or r.get('trainer') or '-')}"
                  + (f", best {escaped(r['best'])}" if r.get("best") else "")
                  + (f", {r['versions']} versions" if r.get("versions", 1) > 1 else "")
                  + (f"  ({r['missing_blobs']} object(s) or recipe(s) missing)" if r["missing_blobs"] else ""))
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
@click.option("--dense", is_flag=True, hidden=True, help="Accepted for older scripts: floats are grouped anyway.")
@click.option("--level", default=None, type=click.IntRange(1, 22), help="zstd level [default: 1].")
@sign_opt
@json_opt
@quiet_opt
def push(run_dir: str, store: str, which: str, dense: bool, level: int | None, sign: str | None, as_json: bool,
         quiet: bool) -> None:
    """Push RUN_DIR into STORE (a folder or a URL such as s3://bucket/runs), as STORE/NAME.

    Tensors and files the store already has (by SHA-256) are not sent again; float tensors are
    stored grouped, or as XOR deltas against the previous checkpoint, whichever is smaller. The
    version appears in the store only once all of it is there."""
    from aptbundle.store.push import push as do_push

    with progress("pushing", quiet, rate=True) as cb:
        r = do_push(run_dir, store, sign=sign, dense=dense, level=level, checkpoints=which, progress=cb)
    for w in r.warnings:
        click.echo(escaped(w), err=True)
    emit(as_json, r.to_dict(),
         f"pushed {escaped(r.name)} to {escaped(r.store)}: {r.sent_files} file(s) sent ({human(r.data_bytes)} as"
         f" {human(r.sent_bytes)}; {r.sent_objects} object(s), {r.delta_objects} of them deltas, and"
         f" {r.present_objects} unchanged), {r.present_files} already there ({human(r.present_bytes)})"
         f" in {r.seconds:.1f} s"
         f"\n  digest {r.digest}" + ("  (signed)" if r.signed else "")
         + f"\n  pull it with: aptbundle pull {escaped(r.store)} {escaped(r.name)}")


@click.command(short_help="Pull a run out of a store into DEST/NAME, verified.")
@click.argument("store")
@click.argument("name")
@click.option("-C", "--dest", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Folder to create NAME/ in (an older version there is updated).")
@click.option("--digest", default=None, callback=digest_opt,
              help="Pull the version with this run digest, not the newest (64 hex digits).")
@click.option("--checkpoints", "which", default="all", show_default=True, metavar="all|latest|best|NAME",
              help="Which checkpoints to pull (only their data is fetched).")
@click.option("--max-size", default=None, callback=size_opt,
              help="Refuse a run that declares more new data than this (e.g. 20G, 500M).")
@trust_opt
@strict_opt
@force_opt
@json_opt
@quiet_opt
def pull(store: str, name: str, dest: str, digest: str | None, which: str, max_size: int | None,
         trust: tuple[str, ...], strict: bool, force: bool, as_json: bool, quiet: bool) -> None:
    """Pull run NAME out of STORE into DEST/NAME, checking every byte before it appears.

    If DEST/NAME holds an older version of the run, only the files it lacks are fetched. Anything
    else there (another run, a newer state, files its manifest does not list) is never replaced:
    the pull is refused, or with --force that copy is moved aside."""
    from aptbundle.store.pull import pull as do_pull

    with progress("pulling", quiet, rate=True) as cb:
        r = do_pull(store, name, dest, digest=digest, trust=list(trust), progress=cb, max_size=max_size,
                    strict=strict, force=force, checkpoints=which)
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
         f"{verb} {r.deleted_blobs} object(s), {r.deleted_recipes} recipe(s) and {r.deleted_manifests} manifest(s),"
         f" {human(r.deleted_bytes)}; kept {r.kept_blobs} object(s) in use and {r.kept_young} younger than"
         f" {grace:g} s")


@click.command(short_help="List the pushed versions of a run in a store.")
@click.argument("store")
@click.argument("name")
@json_opt
def log(store: str, name: str, as_json: bool) -> None:
    """List the versions of run NAME in STORE, oldest first: digest, when, steps, checkpoints and
    size. A version pushed on top of an older one than the version before it (two machines
    pushing at once) is marked as a fork; `pull --digest` reaches any of them."""
    from aptbundle.store.maintain import log as do_log

    rows = do_log(store, name)
    lines = table(
        f"{'digest':<14}{'pushed':<22}{'steps':>7}{'ckpts':>6}{'size':>11}  latest", rows,
        lambda r: f"{r['digest'][:12]:<14}{r['pushed_at']:<22}",
        lambda r: f"{r['digest'][:12]:<14}{r['pushed_at']:<22}{r['step']:>7}{len(r['checkpoints']):>6}"
                  f"{human(r['size']):>11}  {escaped(r['latest'] or '-')}"
                  + (f"  (fork: pushed on top of {r['parent'][:12]})" if r["fork"] else ""))
    emit(as_json, {"store": store, "name": name, "versions": rows}, "\n".join(lines))


@click.command(short_help="Drop old versions of a run from a store (then gc frees them).")
@click.argument("store")
@click.argument("name")
@click.option("--keep-last", required=True, type=click.IntRange(1), help="Keep the newest N versions.")
@click.option("--keep-best", is_flag=True, help="Also keep the version that holds the best checkpoint.")
@click.option("--dry-run", is_flag=True, help="Say what would go; change nothing.")
@json_opt
def forget(store: str, name: str, keep_last: int, keep_best: bool, dry_run: bool, as_json: bool) -> None:
    """Forget all but the last N versions of run NAME in STORE; `aptbundle gc STORE` then deletes
    the data no kept version needs."""
    from aptbundle.store.maintain import forget as do_forget

    r = do_forget(store, name, keep_last=keep_last, keep_best=keep_best, dry_run=dry_run)
    verb = "would forget" if dry_run else "forgot"
    lines = [f"{verb} {len(r.forgotten)} version(s) of {escaped(name)}, kept {len(r.kept)}"]
    lines += [f"  forget {d[:12]}" for d in r.forgotten] + [f"  keep   {d[:12]}" for d in r.kept]
    if r.forgotten and not dry_run:
        lines.append(f"  free their data with: aptbundle gc {escaped(store)}")
    emit(as_json, r.to_dict(), "\n".join(lines))


@click.command(short_help="Check that every run in a store is whole.")
@click.argument("store")
@click.option("--read-data", is_flag=True, help="Also read and decode every object and check its hash.")
@click.option("--no-repair", is_flag=True, help="Only report; do not remove damaged objects and their recipes.")
@json_opt
@quiet_opt
def check(store: str, read_data: bool, no_repair: bool, as_json: bool, quiet: bool) -> None:
    """Check every ref, manifest, recipe and object of STORE (with --read-data, every object's
    bytes). Damaged objects, and recipes that need a damaged or missing one, are removed, so the
    next push of a run that lists them sends them again. Exit status 1 when anything is wrong."""
    from aptbundle.store.check import check as do_check

    with progress("reading", quiet or not read_data, rate=True) as cb:
        r = do_check(store, read_data=read_data, repair=not no_repair, progress=cb)
    for w in r.warnings:
        click.echo(escaped(w), err=True)
    head = (f"{escaped(r.store)}: {r.runs} run(s), {r.versions} version(s), {r.recipes} recipe(s), {r.objects}"
            f" object(s)" + (f", {human(r.read_bytes)} read" if read_data else ""))
    lines = [head + (": no problems" if r.ok else f": {len(r.problems)} problem(s)")]
    for p in r.problems:
        lines.append(f"  {escaped(p['key'])}: {escaped(p['what'])} (needed by {escaped(', '.join(p['runs']))})")
    if r.removed:
        lines.append(f"  removed {len(r.removed)} damaged object(s) and recipe(s); push the runs named above again"
                     " to send them")
    emit(as_json, r.to_dict(), "\n".join(lines))
    if not r.ok:
        raise SystemExit(1)


@click.group(short_help="Manage a store itself (upgrade).")
def store() -> None:
    """Commands about a store as a whole."""


@store.command(short_help="Convert a version-1 store to version 2.")
@click.argument("url")
@json_opt
@quiet_opt
def upgrade(url: str, as_json: bool, quiet: bool) -> None:
    """Convert the store at URL to format version 2 (objects per tensor, history). Each run is
    pulled, verified and pushed back; the old blobs go only when every run is converted."""
    from aptbundle.store.upgrade import upgrade as do_upgrade

    with progress("converting", quiet, rate=True) as cb:
        r = do_upgrade(url, progress=cb)
    text = (f"{escaped(r.store)}: already version {r.was}" if r.was != 1 else
            f"{escaped(r.store)}: converted {r.runs} run(s) to version 2, deleted {r.deleted_blobs} old blob(s)"
            f" in {r.seconds:.1f} s")
    emit(as_json, r.to_dict(), text)

"""What is at a path: a run folder or an archive (local or remote), described, verified, listed
or compared.

``describe`` reads the manifest alone (for an archive only its first member is decompressed,
so inspecting a run of many GB takes milliseconds) and returns plain data; ``verify_path``
runs the one verifier on a run folder or the archive reader's checks on an archive;
``list_runs`` finds the runs and archives under a folder; ``diff`` compares two of them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from aptbundle.archive.extract import verify_archive
from aptbundle.archive.reader import ArchiveReader
from aptbundle.archive.storage import SUFFIX, is_remote
from aptbundle.format import signature
from aptbundle.format.manifest import SIGNATURE_NAME
from aptbundle.format.metrics import METRICS_FILE, checked_curves, read_curves
from aptbundle.format.run import Run
from aptbundle.format.verify import verify_run
from aptbundle.ground.errors import AptBundleError, RunError, SignatureError
from aptbundle.ground.fsutil import Progress
from aptbundle.ground.problems import Kind, Problem, Report
from aptbundle.layouts import drift, title
from aptbundle.layouts import weights_only as weights_only_of


def is_store(path: str | Path) -> bool:
    """True for a store: a URL, or a folder with the store's layout (``format``, ``refs/``,
    ``objects/``, or a version-1 store's ``blobs/``)."""
    if is_remote(path):
        return True
    p = Path(path)
    return (p / "format").is_file() or any((p / d).is_dir() for d in ("refs", "objects", "blobs"))


def is_run_folder(path: str | Path) -> bool:
    """True for a local folder (a run, or a folder that should be one)."""
    return not is_remote(path) and Path(path).is_dir()


def verify_path(path: str | Path, progress: Progress | None = None,
                trust: list[str | Path] | None = None, strict: bool = False) -> Report:
    """Verify a run folder or an ``.aptrun.tar.zst`` archive; every problem in one report.

    With ``trust`` (public key files) the run must also be signed, as it is now, by one of them.

    For example::

        verify_path("outputs/run1").ok
    """
    if not is_run_folder(path):
        return verify_archive(path, progress, trust=trust, strict=strict)
    keys = [signature.load_public_key(k) for k in trust or []]
    run = Run.open(path)
    report = verify_run(run, progress=progress, strict=strict)
    report.problems = group_by_checkpoint(run, report.problems, str(path))
    if keys:
        try:
            signature.check(run.signature(), run.name, run.manifest.digest(), keys, run.name)
        except SignatureError as e:
            report.problems.append(Problem(SIGNATURE_NAME, Kind.SIGNATURE, "signed by a trusted key",
                                           str(e).removeprefix(f"{run.name}: ")))
    return report


def group_by_checkpoint(run: Run, problems: list[Problem], shown: str) -> list[Problem]:
    """For a folder its framework kept writing: one problem per checkpoint folder that appeared or
    went since the manifest was written, instead of one per file in it."""
    moved = drift(run.path, run.manifest)
    if not moved.any:
        return problems
    fix = f"take it in with `aptbundle init --update {shown}`"
    folders = {c.folder: c.name for c in moved.new}
    folders_gone = {run.manifest.checkpoint(n).folder: n for n in moved.gone}
    counts: dict[str, int] = {}
    rest = []
    for p in problems:
        owner = next((f for f in (*folders, *folders_gone) if p.path == f or p.path.startswith(f + "/")), None)
        if owner is None or p.kind not in (Kind.EXTRA, Kind.MISSING):
            rest.append(p)
        else:
            counts[owner] = counts.get(owner, 0) + 1
    grouped = [Problem(f, Kind.EXTRA, "no such checkpoint (not in the manifest)",
                       f"checkpoint {folders[f]} ({n} files) that the framework wrote since; {fix}")
               for f, n in counts.items() if f in folders]
    grouped += [Problem(f, Kind.MISSING, f"checkpoint {folders_gone[f]} (in the manifest)",
                        f"{n} of its files gone from disk (the framework rotated it out?); {fix}")
                for f, n in counts.items() if f in folders_gone]
    return sorted(grouped + rest, key=lambda p: p.path)


def describe(path: str | Path) -> dict:
    """Everything ``inspect`` shows, as plain data.

    For example::

        describe("run1.aptrun.tar.zst")["checkpoints"][-1]["step"]
    """
    archive_size = requires = sig = None
    curves: dict = {}
    if is_run_folder(path):
        run = Run.open(path)
        man, kind, sig = run.manifest, "run", run.signature()
        log = Path(path) / METRICS_FILE
        if METRICS_FILE in man.file_map() and log.is_file():  # the full log of a run folder
            curves = read_curves(log.read_bytes())
    else:
        with ArchiveReader(path) as ar:
            man, archive_size, requires, kind, sig = ar.manifest, ar.size, ar.requires, "archive", ar.signature
    best = man.best.name if man.best else None
    lacks = weights_only_of(man)
    moved = drift(Path(path), man) if kind == "run" else None
    curves = curves or checked_curves(man.extra.get("curves"))
    if not curves:  # a run written before curves were recorded: the checkpoints' losses
        curves = {"loss": [[c.step, float(c.metrics["loss"])] for c in man.checkpoints
                           if isinstance(c.metrics.get("loss"), (int, float))]}
    return {
        "path": str(path),
        "kind": kind,
        "name": man.name,
        "digest": man.digest(),
        "signed_by": signature.signed_by(sig, man.name, man.digest()),
        "run_id": man.run_id,
        "trainer": man.trainer,
        "created_at": man.created_at,
        "updated_at": man.updated_at,
        "environment": man.environment,
        "history": man.history,
        "framework": title(man.layout),
        "layout": man.layout,
        "untrusted": man.untrusted,
        "links": [{"path": x.path, "target": x.target} for x in man.links],
        "machine_paths": {k: v for k, v in man.extra.get("machine_paths", {}).items()
                          if isinstance(k, str) and isinstance(v, str)}
        if isinstance(man.extra.get("machine_paths"), dict) else {},
        "files": len(man.files),
        "size": man.total_size(),
        "archive_size": archive_size,
        "needs_aptbundle": requires is not None,  # a --dense archive: plain tar gives grouped bytes
        "codec": requires,
        "latest": man.latest,
        "best": (man.best.__dict__ if man.best else None),
        "checkpoints": [
            {"name": c.name, "step": c.step, "epoch": c.epoch, "loss": c.metrics.get("loss"),
             "metrics": c.metrics, "latest": c.name == man.latest, "best": c.name == best,
             "size": sum(f.size for f in man.files_of(c)), "resumable": not lacks.get(c.name),
             "missing": lacks.get(c.name, [])}
            for c in man.checkpoints
        ],
        "unlisted_checkpoints": [c.name for c in moved.new] if moved else [],
        "gone_checkpoints": moved.gone if moved else [],
        "framework_notes": man.extra.get("framework_notes") if isinstance(man.extra.get("framework_notes"), dict)
        else {},
        "curves": curves,
    }


def _manifest_of(path: str | Path):
    if is_run_folder(path):
        return Run.open(path).manifest, None
    with ArchiveReader(path) as ar:
        return ar.manifest, ar.size


def _summary(path: Path, man, archive_size) -> dict:
    best = man.checkpoint(man.best.name) if man.best else None
    losses = [c.metrics["loss"] for c in man.checkpoints if isinstance(c.metrics.get("loss"), (int, float))]
    best_loss = best.metrics.get("loss") if best else (min(losses) if losses else None)
    latest = man.checkpoint(man.latest) if man.latest else None
    return {"path": str(path), "kind": "run" if archive_size is None else "archive", "name": man.name,
            "steps": latest.step if latest else 0, "checkpoints": len(man.checkpoints),
            "best_loss": best_loss if isinstance(best_loss, (int, float)) else None,
            "size": man.total_size() if archive_size is None else archive_size, "digest": man.digest(),
            "resumable": latest is None or latest.name not in weights_only_of(man)}


def list_runs(root: str | Path = ".", depth: int = 3) -> list[dict]:
    """Runs and archives under ``root`` (a few levels deep), each summed up in a dict.

    A folder that cannot be read as a run or an archive is listed with its error, not skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise RunError(f"{root}: no such folder; expected a folder holding runs or archives")
    found: list[dict] = []

    def visit(folder: Path, level: int) -> None:
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            return
        for p in entries:
            if p.name.startswith(".") or p.is_symlink():
                continue
            target = p if (p.is_dir() and Run.is_run(p)) or (p.is_file() and p.name.endswith(SUFFIX)) else None
            if target is not None:
                try:
                    found.append(_summary(p, *_manifest_of(p)))
                except AptBundleError as e:
                    found.append({"path": str(p), "kind": "unreadable", "error": str(e)})
            elif p.is_dir() and level < depth:
                visit(p, level + 1)

    visit(root, 1)
    return found


def read_text_member(path: str | Path, rel: str, limit: int = 1 << 20) -> str | None:
    """A small listed text file of a run or an archive (hash-checked), or None if it has none."""
    if is_run_folder(path):
        run = Run.open(path)
        entry = run.manifest.file_map().get(rel)
        if entry is None or entry.size > limit:
            return None
        data = (run.path / rel).read_bytes()
        return data.decode("utf-8", "replace") if hashlib.sha256(data).hexdigest() == entry.sha256 else None
    with ArchiveReader(path) as ar:
        entry = ar.manifest.file_map().get(rel)
        if entry is None or entry.size > limit:
            return None
        for m in ar.members():
            if m.rel == rel:
                chunks: list[bytes] = []
                if m.check(scan=False, taps=[lambda b: chunks.append(bytes(b))]):
                    return None
                return b"".join(chunks).decode("utf-8", "replace")
    return None


def diff(a: str | Path, b: str | Path) -> dict:
    """What differs between two runs or archives: config, files, checkpoints, final metrics."""
    ma, _ = _manifest_of(a)
    mb, _ = _manifest_of(b)
    fa, fb = ma.file_map(), mb.file_map()
    config: dict = {}
    if fa.get("config.json") != fb.get("config.json"):
        ca, cb = (_json_object(read_text_member(x, "config.json")) for x in (a, b))
        config = {k: [ca.get(k), cb.get(k)] for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)}
    la = ma.checkpoint(ma.latest) if ma.latest else None
    lb = mb.checkpoint(mb.latest) if mb.latest else None
    return {
        "a": {"path": str(a), "name": ma.name, "digest": ma.digest()},
        "b": {"path": str(b), "name": mb.name, "digest": mb.digest()},
        "same": ma.digest() == mb.digest(),
        "config": config,
        "files": {"only_a": sorted(set(fa) - set(fb)), "only_b": sorted(set(fb) - set(fa)),
                  "changed": sorted(p for p in set(fa) & set(fb) if fa[p].sha256 != fb[p].sha256)},
        "checkpoints": {"only_a": [c.name for c in ma.checkpoints if not mb.checkpoint(c.name)],
                        "only_b": [c.name for c in mb.checkpoints if not ma.checkpoint(c.name)],
                        "both": [c.name for c in ma.checkpoints if mb.checkpoint(c.name)]},
        "final": {"a": {"checkpoint": la.name, "step": la.step, **la.metrics} if la else None,
                  "b": {"checkpoint": lb.name, "step": lb.step, **lb.metrics} if lb else None},
    }


def _json_object(text: str | None) -> dict:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}

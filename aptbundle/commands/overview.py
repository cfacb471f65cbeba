"""What is at a path: a run folder or an archive (local or remote), described or verified.

``describe`` reads the manifest alone (for an archive only its first member is decompressed,
so inspecting a run of many GB takes milliseconds) and returns plain data; ``verify_path``
runs the one verifier on a run folder or the archive reader's checks on an archive.
"""

from __future__ import annotations

from pathlib import Path

from aptbundle.archive.extract import verify_archive
from aptbundle.archive.reader import ArchiveReader
from aptbundle.archive.storage import is_remote
from aptbundle.format.run import Run
from aptbundle.format.verify import verify_run
from aptbundle.ground.fsutil import Progress
from aptbundle.ground.problems import Report


def is_run_folder(path: str | Path) -> bool:
    """True for a local folder (a run, or a folder that should be one)."""
    return not is_remote(path) and Path(path).is_dir()


def verify_path(path: str | Path, progress: Progress | None = None) -> Report:
    """Verify a run folder or an ``.aptrun.tar.zst`` archive; every problem in one report.

    >>> # verify_path("outputs/run1").ok
    """
    if is_run_folder(path):
        return verify_run(Run.open(path), progress=progress)
    return verify_archive(path, progress)


def describe(path: str | Path) -> dict:
    """Everything ``inspect`` shows, as plain data.

    >>> # describe("run1.aptrun.tar.zst")["checkpoints"][-1]["step"]
    """
    archive_size = requires = None
    if is_run_folder(path):
        man, kind = Run.open(path).manifest, "run"
    else:
        with ArchiveReader(path) as ar:
            man, archive_size, requires, kind = ar.manifest, ar.size, ar.requires, "archive"
    best = man.best.name if man.best else None
    return {
        "path": str(path),
        "kind": kind,
        "name": man.name,
        "digest": man.digest(),
        "run_id": man.run_id,
        "trainer": man.trainer,
        "created_at": man.created_at,
        "updated_at": man.updated_at,
        "environment": man.environment,
        "history": man.history,
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
             "size": sum(f.size for f in man.files if f.path.startswith(c.folder + "/"))}
            for c in man.checkpoints
        ],
    }

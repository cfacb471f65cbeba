"""``verify`` for a run directory or an archive: every problem at once, as one report.

A run is rehashed file by file against its manifest, and every pickle and safetensors file is
checked statically (``aptbundle.scan``). An archive is read as a stream, without unpacking it to
disk, with the same checks ``unpack`` makes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aptbundle.fsutil import announce_total
from aptbundle.run import Problem, Run
from aptbundle.scan import unsafe_problems


@dataclass
class Report:
    """Outcome of a verification."""

    path: str
    kind: str  # "run" or "archive"
    files: int = 0
    size: int = 0
    digest: str = ""
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "ok": self.ok, "files": self.files,
                "size": self.size, "digest": self.digest, "problems": [p.to_dict() for p in self.problems]}


def verify_run(run: Run, progress=None) -> list[Problem]:
    """Rehash every file and statically scan the pickled and safetensors ones."""
    problems = run.verify(progress)
    bad = {p.path for p in problems}
    problems += unsafe_problems(run.path, [f.path for f in run.manifest.files if f.path not in bad])
    return sorted(problems, key=lambda p: p.path)


def verify_path(path: str | Path, progress=None) -> Report:
    """Verify a run folder or an ``.aptrun.tar.zst`` archive.

    >>> # verify_path("outputs/run1").ok
    """
    p = Path(path)
    if "://" not in str(path) and p.is_dir():
        run = Run.open(p)
        rep = Report(str(path), "run", len(run.manifest.files), run.manifest.total_size(), run.manifest.digest())
        announce_total(progress, rep.size)
        rep.problems = verify_run(run, progress)
        return rep
    from aptbundle.archive import verify_archive

    return verify_archive(path, progress)

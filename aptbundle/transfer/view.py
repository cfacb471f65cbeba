"""The read view: what ``pack`` and ``push`` read a run through.

``read_view(run_dir, ...)`` takes the run's commit lock (shared), selects the checkpoints that
travel (``Manifest.select``), gates on the run matching its manifest (a quick check of
presence and sizes, then, only when that fails, a full check that names every problem), signs
the digest or carries the run's own signature, and hard-links the listed files into a private
folder of the run. The lock is then released, so a trainer may commit and retire checkpoints
while the caller reads the view: writers never change a file in place (they write a new one and
rename it), so the links keep exactly the bytes the manifest describes. Where hard links are not
possible, the lock is held until the caller is done. Each file is still hashed and scanned as
the caller reads it (``verify.check_stream``). Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from aptbundle.format import signature
from aptbundle.format.manifest import SIGNATURE_NAME, Manifest
from aptbundle.format.run import Run
from aptbundle.format.verify import verify_files, verify_run
from aptbundle.ground import temporaries
from aptbundle.ground.temporaries import remove_path
from aptbundle.ground.errors import AptBundleError, ArchiveError, VerifyError
from aptbundle.ground.problems import Kind, Problem

CHECKPOINT_CHOICES = ("all", "latest", "best")


@dataclass(frozen=True)
class ReadView:
    """A consistent state of a run to read from: ``root`` holds exactly ``manifest``'s files."""

    run: Run
    manifest: Manifest
    root: Path
    signature: bytes | None  # the DSSE envelope that travels with it, if any


@contextlib.contextmanager
def read_view(run_dir: str | Path, *, checkpoints: str = "all", sign: str | Path | None = None,
              verb: str = "packed") -> Iterator[ReadView]:
    """The view of ``run_dir`` that ``pack`` and ``push`` read (``verb`` names the caller's work
    in messages). ``sign`` is a private key file: the digest is signed with it."""
    if checkpoints not in CHECKPOINT_CHOICES:
        raise ArchiveError(f"--checkpoints {checkpoints!r}: expected all, latest or best")
    if sign is not None:
        signature.load_private_key(sign)  # a bad key is refused before any work
    run = Run.open(run_dir)
    temporaries.clean_stale(run.path, "pack")
    snap = None
    try:
        with contextlib.ExitStack() as held:
            held.enter_context(run.reading())
            run.reload()
            man = run.manifest.select(checkpoints)
            gate = (lambda **kw: verify_run(run, **kw)) if checkpoints == "all" else \
                (lambda **kw: verify_files(run, [f.path for f in man.files], **kw))
            if not gate(quick=True).ok:  # name every problem, not just the cheap ones
                refuse(run, gate().problems, verb)
            sig = signature.sign(man.name, man.digest(), sign) if sign is not None else carried_signature(run, man)
            snap = snapshot(run.path, man)
            if snap is None:  # no hard links here: keep commits out while the files are read in place
                yield ReadView(run, man, run.path, sig)
                return
        yield ReadView(run, man, snap, sig)
    finally:
        if snap is not None:
            remove_path(snap)


def refuse(run: Run, problems: list[Problem], verb: str) -> None:
    """Raise for a run that does not match its manifest; when it only gained or lost files (a
    folder a framework keeps writing), say so and name the command that takes them in."""
    if problems and all(p.kind in (Kind.EXTRA, Kind.MISSING) for p in problems):
        def few(kind: Kind, what: str) -> str:
            paths = [p.path for p in problems if p.kind == kind]
            return f"{len(paths)} {what} ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''})" if paths else ""

        what = "; ".join(x for x in (few(Kind.EXTRA, "new file(s) the manifest does not list"),
                                     few(Kind.MISSING, "listed file(s) gone")) if x)
        raise ArchiveError(f"{run.path}: {what}; nothing was {verb}. Take the changes in with `aptbundle init --update"
                           f" {run.path}` (or list what should not travel in {run.path}/.aptignore)")
    hint = None
    if not run.manifest.trainer and all(p.kind in (Kind.EXTRA, Kind.MISSING, Kind.SIZE, Kind.HASH) for p in problems):
        hint = (f"the folder changed since its manifest was written; if its framework is still writing it, take the"
                f" changes in with `aptbundle init --update {run.path}`")
    raise VerifyError(problems, what=f"run {run.name} (not {verb})", hint=hint)


def carried_signature(run: Run, man: Manifest) -> bytes | None:
    """The run's own ``aptrun.sig`` when it signs exactly ``man`` (else None: it would not verify)."""
    data = run.signature()
    try:
        env = signature.parse_envelope(data, SIGNATURE_NAME) if data is not None else None
    except AptBundleError:
        return None
    return data if env is not None and env.digest == man.digest() and env.name == man.name else None


def snapshot(root: Path, man: Manifest) -> Path | None:
    """Hard-link the listed files into a private folder inside the run (None where links fail)."""
    snap = temporaries.temp_path(root, "pack")
    try:
        snap.mkdir()
        for f in man.files:
            dst = snap / f.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(root / f.path, dst, follow_symlinks=False)
    except OSError:
        remove_path(snap)
        return None
    return snap


def file_mode(path: Path) -> int:
    """The mode a moved file keeps: private (0600) and executable (0755/0700) files keep that,
    everything else is 0644, so the umask of the machine that reads the run never changes it."""
    m = os.stat(path).st_mode
    private, exe = not m & 0o077, bool(m & 0o100)
    return (0o700 if exe else 0o600) if private else (0o755 if exe else 0o644)

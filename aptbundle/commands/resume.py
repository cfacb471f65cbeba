"""``aptbundle resume``: find the run, verify the checkpoint once, hand it to the run's trainer.

The trainer is looked up by the name the manifest records among the registered entry points of
group ``aptbundle.trainers``; a manifest never names a module to import. Everything happens
under the run's writer lock: a run another trainer is writing is refused at once ("is being
written by process N"), never misread while it changes. The checkpoint is resolved and
verified (hashed and scanned) here, once, and the ``VerifiedCheckpoint`` is passed to the
trainer, which loads it without reading it again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from aptbundle.format.run import Run
from aptbundle.format.verify import VerifiedCheckpoint, verify_checkpoint
from aptbundle.ground.errors import FrameworkRun, ResumeError
from aptbundle.layouts import drift, missing_text, resume_call, title
from aptbundle.layouts import weights_only as weights_only_of

GROUP = "aptbundle.trainers"


@dataclass(frozen=True)
class ResumeRequest:
    """What ``aptbundle resume`` asks of a trainer."""

    which: str = "latest"  # the checkpoint asked for: latest, best or a name
    checkpoint: VerifiedCheckpoint | None = None  # that checkpoint, verified (None: a run killed before its first)
    epochs: int | None = None  # train to this many epochs in total, and keep it as the plan
    stop_at_step: int | None = None  # save and stop after this global step
    device: str = "auto"  # auto, cpu or cuda
    data: str | Path | None = None  # the corpus, when it did not travel with the run
    allow_data_change: bool = False  # continue even if the data differs from the run's
    quiet: bool = False  # no progress bar or messages
    backup_to: str | None = None  # push the run to this store after each checkpoint
    weights_only: bool = False  # a foreign run's weights-only checkpoint: print its framework's call anyway


@dataclass(frozen=True)
class ResumeResult:
    """What a trainer reports back when its session ends."""

    run_dir: Path
    global_step: int
    finished: bool  # the planned length was reached
    last_checkpoint: str | None = None
    stopped_by: int | None = None  # the signal that stopped the session, if one did


class ResumeTrainer(Protocol):
    """What a trainer registers under the entry-point group ``aptbundle.trainers``: a callable
    that continues the run at ``run_dir`` as ``request`` asks, under the run's writer lock (held
    by the caller)."""

    def __call__(self, run_dir: Path, request: ResumeRequest) -> ResumeResult: ...


def find_run(path: str | Path | None = None, cwd: str | Path | None = None) -> Path:
    """The run to resume: ``path``, else the current folder if it is a run, else the only run
    directly below it or below ``./outputs/``.

    After ``aptbundle unpack run1.aptrun.tar.zst`` in an empty folder, ``find_run()`` is ``run1``.
    """
    if path is not None:
        p = Path(path)
        if not Run.is_run(p):
            raise ResumeError(f"{path}: not a run (no aptrun.json); pass the folder `aptbundle unpack` printed")
        return p
    here = Path(cwd) if cwd is not None else Path(".")
    if Run.is_run(here):
        return here
    found = []
    for base in (here, here / "outputs"):
        if base.is_dir():
            found += sorted(d for d in base.iterdir() if d.is_dir() and Run.is_run(d))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ResumeError("no run found here or in ./outputs; unpack one first (`aptbundle unpack"
                          " NAME.aptrun.tar.zst`) or give its folder: `aptbundle resume RUN_DIR`")
    shown = ", ".join(str(p) for p in found)
    raise ResumeError(f"several runs found ({shown}); say which: `aptbundle resume {found[0]}`")


def registered_trainers() -> dict[str, Any]:
    """Entry points of group ``aptbundle.trainers`` by name."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def find_trainer(name: str | None, run_name: str) -> ResumeTrainer:
    """The resume function registered under ``name``."""
    if not name:
        raise ResumeError(f"{run_name}: its manifest names no trainer (an adopted folder?); aptbundle can"
                          " verify and move it, but continuing it needs the training code that wrote it")
    eps = registered_trainers()
    if name not in eps:
        have = ", ".join(sorted(eps)) or "none"
        raise ResumeError(f"{run_name}: trainer {name!r} is not installed here (registered: {have});"
                          f" install the package that provides it")
    return eps[name].load()


def framework_hint(run: Run, which: str, shown: str, weights_only: bool = False) -> str:
    """What to run for a folder another framework wrote: its own resume call, ready to paste.

    Refused (``ResumeError``) when the folder moved on since its manifest was written (the call
    would name an old checkpoint), or when the checkpoint holds weights only and ``weights_only``
    was not asked for (the framework would restart what is missing)."""
    man = run.manifest
    moved = drift(run.path, man)
    if moved.any:
        news = ", ".join(c.name for c in moved.new[:5]) + (" ..." if len(moved.new) > 5 else "")
        gone = ", ".join(moved.gone[:5]) + (" ..." if len(moved.gone) > 5 else "")
        what = "; ".join(x for x in (f"{len(moved.new)} checkpoint(s) on disk the manifest does not list ({news});"
                                     f" the framework would resume from {moved.new[-1].name}" if moved.new else "",
                                     f"{len(moved.gone)} listed checkpoint(s) gone ({gone})" if moved.gone else "")
                         if x)
        raise ResumeError(f"{run.name}: the folder moved on since its manifest was written: {what}. Take that in with"
                          f" `aptbundle init --update {shown}`, then `aptbundle resume {shown}` again")
    name = {"latest": man.latest, "best": man.best.name if man.best else None}.get(which, which)
    entry = man.checkpoint(name) if name else None
    if man.checkpoints and entry is None:
        raise ResumeError(f"{run.name}: no checkpoint {which!r} (checkpoints: {', '.join(c.name for c in man.checkpoints)})")
    call = resume_call(man.layout, shown, entry)
    if man.layout == "checkpoints":
        return f"{run.name}: its manifest names no trainer, so aptbundle cannot continue it; use {call}"
    lacks = weights_only_of(man).get(entry.name) if entry else None
    if lacks and not weights_only:
        raise ResumeError(f"{run.name}: {entry.name} holds weights only (no {missing_text(lacks)}); resumed from it,"
                          f" {title(man.layout)} starts the {missing_text(lacks)} afresh and the run will not match one"
                          " that never stopped. Pass --weights-only to print the call anyway")
    return (f"{run.name}: written by {title(man.layout)}; aptbundle verified it and moved it, and the framework"
            f" continues it with your training script: {call}"
            + (f" (weights only: the {missing_text(lacks)} start afresh)" if lacks else ""))


def resume(run_dir: str | Path | None = None, request: ResumeRequest | None = None) -> ResumeResult:
    """Continue a run with its registered trainer; returns what the trainer reports.

    The checkpoint ``request.which`` is verified here, once, and handed to the trainer in the
    request (a run killed before its first checkpoint gets None and is started again).
    """
    request = request or ResumeRequest()
    run = Run.open(find_run(run_dir))
    if not run.manifest.trainer and run.manifest.layout:
        raise FrameworkRun(framework_hint(run, request.which, str(run_dir) if run_dir is not None else str(run.path),
                                          request.weights_only))
    fn = find_trainer(run.manifest.trainer, run.name)
    with run.writer():
        fresh = request.which == "latest" and run.latest is None
        checkpoint = None if fresh else verify_checkpoint(run, request.which)
        return fn(run.path, dataclasses.replace(request, checkpoint=checkpoint))

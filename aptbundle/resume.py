"""``aptbundle resume``: find the run, check it, find its trainer, continue it.

The trainer is looked up by the name the manifest records among the registered entry points of
group ``aptbundle.trainers``; a manifest never names a module to import. Before the trainer
loads anything, the checkpoint to resume from is rehashed and every pickled or safetensors file
of the run is scanned statically.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from aptbundle.errors import ResumeError, VerifyError
from aptbundle.run import Run
from aptbundle.scan import unsafe_problems

GROUP = "aptbundle.trainers"


def find_run(path: str | Path | None = None, cwd: str | Path | None = None) -> Path:
    """The run to resume: ``path``, else the current folder if it is a run, else the only run
    directly below it or below ``./outputs/``.

    >>> # find_run()  ->  PosixPath('run1') after `aptbundle unpack run1.aptrun.tar.zst`
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


def find_trainer(name: str | None, run_name: str) -> Callable[..., Any]:
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


def check_before_load(run: Run, which: str) -> str:
    """Rehash the checkpoint ``which`` and scan every pickle/safetensors file of the run."""
    entry = run.resolve_checkpoint(which)
    files = [f.path for f in run.files_under(entry.folder)]
    problems = run.verify(only=files) + unsafe_problems(run.path, [f.path for f in run.manifest.files])
    if problems:
        raise VerifyError(problems, what=f"{run.name} (not resumed)")
    return entry.name


def resume(run_dir: str | Path | None = None, *, which: str = "latest", epochs: int | None = None,
           stop_at_step: int | None = None, device: str = "auto", data: str | Path | None = None,
           allow_data_change: bool = False, quiet: bool = False) -> Any:
    """Continue a run with its registered trainer; returns what the trainer returns."""
    path = find_run(run_dir)
    run = Run.open(path)
    fn = find_trainer(run.manifest.trainer, run.name)
    check_before_load(run, which)
    return fn(path, which=which, epochs=epochs, stop_at_step=stop_at_step, device=device, data=data,
              allow_data_change=allow_data_change, quiet=quiet)

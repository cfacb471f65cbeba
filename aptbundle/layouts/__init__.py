"""Foreign training outputs: which framework wrote a folder, its checkpoints, best and history.

One module per layout, each with the same three functions:

``recognise(root, files) -> Found | None``
    whether the folder (its listed ``files``) is this framework's output, and if so its
    checkpoints (with step, epoch and loss where the framework recorded them), the best one,
    the loss curves and a history entry, read from the framework's own records (never by
    running anything: JSON is parsed, pickles are only walked);
``resume_call(run, checkpoint) -> str``
    the framework's own call that continues from ``checkpoint``, ready to paste.

``detect`` tries them in order (a Hugging Face ``output_dir`` also holds a ``save_pretrained``
folder at its top, so the Trainer comes first). What each file may contain is not decided here
but by the trust policy (``format.trust``), per file. Nothing here imports torch or the
frameworks.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from aptbundle.format.manifest import BestInfo, CheckpointEntry

ORDER = ("hf_trainer", "accelerate", "lightning", "dcp", "native", "pretrained")


@dataclass
class Found:
    """What a layout module recognised in a folder."""

    layout: str  # the manifest's ``layout``: hf-trainer, accelerate, lightning, dcp, save-pretrained
    title: str  # for people: "Hugging Face Trainer"
    checkpoints: list[CheckpointEntry] = field(default_factory=list)
    best: BestInfo | None = None
    curves: dict[str, list[list[float]]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def _module(name: str):
    return importlib.import_module(f"aptbundle.layouts.{name}")


def detect(root: Path, files: list[str]) -> Found | None:
    """The first layout that recognises the folder, or None (a plain folder)."""
    for name in ORDER:
        found = _module(name).recognise(Path(root), files)
        if found is not None:
            found.checkpoints.sort(key=lambda c: (c.step, c.name))
            return found
    return None


def by_layout(layout: str | None):
    """The module of a manifest's ``layout`` value, or None."""
    for name in ORDER:
        mod = _module(name)
        if mod.LAYOUT == layout:
            return mod
    return None


def title(layout: str | None) -> str | None:
    mod = by_layout(layout)
    return mod.TITLE if mod else None


def resume_call(layout: str | None, run: str, checkpoint: CheckpointEntry | None) -> str | None:
    """The framework's own resume call for ``checkpoint`` of the run at ``run``, or None."""
    mod = by_layout(layout)
    return mod.resume_call(run.rstrip("/"), checkpoint) if mod else None


def folder_checkpoints(folders: list[str]) -> list[CheckpointEntry]:
    """One checkpoint per folder, named after it, its step the number in its name; the folder
    "" (the whole output is one checkpoint) is not a checkpoint of itself. Two folders of the
    same name in different places are named by their path instead."""
    out = []
    for folder in folders:
        if folder:
            name = folder.rsplit("/", 1)[-1]
            out.append(CheckpointEntry(name, step_of(name), 0, {}, None if folder == f"checkpoints/{name}" else folder))
    if len({c.name for c in out}) != len(out):
        out = [CheckpointEntry(c.folder.replace("/", "_"), c.step, 0, {}, c.folder) for c in out]
    return out


def step_of(name: str) -> int:
    """The last number in a checkpoint's name (``checkpoint-20`` -> 20, ``step-5`` -> 5), else 0."""
    digits = "".join(c if c.isdigit() else " " for c in name).split()
    return int(digits[-1]) if digits and len(digits[-1]) < 16 else 0


def finite(v) -> bool:
    return type(v) in (int, float) and v == v and abs(v) != float("inf")

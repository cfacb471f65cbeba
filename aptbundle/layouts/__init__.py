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
import io
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aptbundle.format.manifest import BestInfo, CheckpointEntry
from aptbundle.format.pickles import Inert, Storage, read_pickle
from aptbundle.format.stream import Stream, file_source
from aptbundle.ground.errors import UnsafeContentError
from aptbundle.ground.values import finite_number

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


MAX_PICKLE = 64 << 20


class FrameworkPickle:
    """What a framework's ``torch.save`` zip holds, read by the scan engine with every global inert
    (``format.pickles.read_pickle``: nothing is run), and the open zip for a tensor's bytes."""

    def __init__(self, path: Path):
        self.zip: zipfile.ZipFile | None = None
        self.data: Any = None
        try:
            z = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile, ValueError):
            return
        pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
        try:
            if pkl is None or z.getinfo(pkl).file_size > MAX_PICKLE:
                raise ValueError("no pickle of a size to read")
            raw = z.read(pkl)
            self.data = read_pickle(Stream(file_source(io.BytesIO(raw)), len(raw)), f"{path.name}:{pkl}")
            self.zip, self._prefix = z, pkl[:-len("data.pkl")]
        except (OSError, zipfile.BadZipFile, ValueError, KeyError, UnsafeContentError):
            z.close()

    def __enter__(self) -> "FrameworkPickle":
        return self

    def __exit__(self, *exc) -> None:
        if self.zip is not None:
            self.zip.close()

    def scalar(self, tensor: Any) -> float | None:
        """The value of a one-element float tensor the pickle holds (read from its storage)."""
        if not (isinstance(tensor, Inert) and tensor.args and isinstance(tensor.args[0], Storage) and self.zip):
            return None
        st, offset = tensor.args[0], tensor.args[1] if len(tensor.args) > 1 and type(tensor.args[1]) is int else 0
        fmt = {"torch.FloatStorage": "<f", "torch.DoubleStorage": "<d"}.get(st.cls)
        if fmt is None:
            return None
        try:
            raw = self.zip.read(f"{self._prefix}data/{st.key}")
            return finite_number(struct.unpack_from(fmt, raw, offset * struct.calcsize(fmt))[0])
        except (KeyError, struct.error, OSError, zipfile.BadZipFile):
            return None


def fields(obj: Any) -> dict:
    """The attributes or entries of what a framework pickle built: a dict as it is, a stand-in's
    recorded state and items (``Inert.fields``), else nothing."""
    if isinstance(obj, dict):
        return obj
    return obj.fields() if isinstance(obj, Inert) else {}

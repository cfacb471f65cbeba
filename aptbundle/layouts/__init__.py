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
from aptbundle.format.run import walk_files
from aptbundle.format.stream import Stream, file_source
from aptbundle.ground.errors import UnsafeContentError
from aptbundle.ground.values import finite_number

ORDER = ("hf_trainer", "accelerate", "lightning", "composer", "ray_train", "dcp", "native", "pretrained")


@dataclass
class Found:
    """What a layout module recognised in a folder."""

    layout: str  # the manifest's ``layout``: hf-trainer, accelerate, lightning, dcp, save-pretrained
    title: str  # for people: "Hugging Face Trainer"
    checkpoints: list[CheckpointEntry] = field(default_factory=list)
    best: BestInfo | None = None
    curves: dict[str, list[list[float]]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)  # weights-only checkpoints: what they lack
    notes: dict[str, object] = field(default_factory=dict)  # what the framework does after a move (extra)


# What a checkpoint can lack for its framework to carry on exactly where it stopped, in words.
PARTS = {"optimizer": "optimizer state", "scheduler": "learning-rate schedule", "rng": "RNG state",
         "trainer_state": "trainer state", "loops": "loop progress"}


def lacking(names: set[str], wanted: dict[str, tuple[str, ...]]) -> list[str]:
    """The parts of ``wanted`` (part -> file-name prefixes, any of which will do) that none of the
    file ``names`` of a checkpoint provide."""
    return [part for part, prefixes in wanted.items() if not any(n.startswith(prefixes) for n in names)]


def weights_only(man) -> dict[str, list[str]]:
    """The manifest's record of its weights-only checkpoints (checkpoint -> parts it lacks),
    as far as it is well formed (a manifest may come from anyone)."""
    raw = man.extra.get("weights_only")
    names = {c.name for c in man.checkpoints}
    if not isinstance(raw, dict):
        return {}
    return {k: [p for p in v if p in PARTS] for k, v in raw.items()
            if k in names and isinstance(v, list) and all(isinstance(p, str) for p in v)}


def missing_text(parts: list[str]) -> str:
    return ", ".join(PARTS.get(p, p) for p in parts)


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


@dataclass
class Drift:
    """How an adopted folder moved on since its manifest was written: checkpoints its framework
    wrote that the manifest lacks (newest last), and listed ones that are gone."""

    new: list[CheckpointEntry]
    gone: list[str]

    @property
    def any(self) -> bool:
        return bool(self.new or self.gone)


def drift(root: Path, man) -> Drift:
    """Compare the checkpoints on disk (as the manifest's layout recognises them) with the
    manifest's; an aptbundle run (a trainer writes its manifest) never drifts."""
    mod = by_layout(man.layout)
    if mod is None or man.trainer:
        return Drift([], [])
    files, _problems = walk_files(Path(root), man.links)
    found = mod.recognise(Path(root), files)
    on_disk = {c.name: c for c in (found.checkpoints if found else [])}
    listed = {c.name for c in man.checkpoints}
    new = sorted((c for n, c in on_disk.items() if n not in listed), key=lambda c: (c.step, c.name))
    listed_files = man.file_map()
    gone = [c.name for c in man.checkpoints if c.name not in on_disk
            and not all((Path(root) / f.path).is_file() for f in man.files_of(c) if f.path in listed_files)]
    return Drift(new, gone)

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
import pickletools
import zipfile
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


MAX_PICKLE = 64 << 20
_STR = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_INT = {"BININT", "BININT1", "BININT2", "LONG1", "INT", "LONG"}
_PLAIN = {"NEWTRUE": True, "NEWFALSE": False, "NONE": None}


def pickle_tokens(path: Path) -> tuple[list[tuple[str, object]], zipfile.ZipFile | None]:
    """The plain values of a ``torch.save`` zip's pickle, in order, as ``(kind, value)``: kind is
    ``str``, ``int``, ``float``, ``const`` (True, False, None) or ``op`` (anything else). Walked
    with ``pickletools``, nothing is run; strings fetched again from the memo count again. Also
    the open zip (the caller closes it), for a tensor's bytes; ``([], None)`` when unreadable."""
    try:
        z = zipfile.ZipFile(path)
        pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None or z.getinfo(pkl).file_size > MAX_PICKLE:
            z.close()
            return [], None
        tokens: list[tuple[str, object]] = []
        memo: dict[int, object] = {}
        last: object = None
        for op, arg, _pos in pickletools.genops(z.read(pkl)):
            n = op.name
            if n in _STR or n in _INT or n in ("BINFLOAT", "FLOAT"):
                last = arg
                tokens.append(("str" if n in _STR else "int" if n in _INT else "float", arg))
            elif n in _PLAIN:
                tokens.append(("const", _PLAIN[n]))
            elif n in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = last
            elif n == "MEMOIZE":
                memo[len(memo)] = last
            elif n in ("BINGET", "LONG_BINGET", "GET"):
                last = memo.get(arg)
                if isinstance(last, str):
                    tokens.append(("str", last))
            else:
                last = None
                tokens.append(("op", n))
        return tokens, z
    except (OSError, zipfile.BadZipFile, ValueError, KeyError, RecursionError):
        return [], None


def value_after(tokens: list[tuple[str, object]], key: str, kinds: tuple[str, ...] = ("str", "int", "float", "const")):
    """The plain value right after the string ``key`` (a dict entry or attribute), or None."""
    for i, (kind, v) in enumerate(tokens[:-1]):
        if kind == "str" and v == key and tokens[i + 1][0] in kinds:
            return tokens[i + 1][1]
    return None


"""Composer (MosaicML): ``ep{E}-ba{B}-rank{R}.pt`` files in the ``save_folder``, one per rank.

A checkpoint is the rank-0 file (with its other ranks' files beside it); its epoch and batch come
from the name, checked against the ``Timestamp`` inside (read by the scan engine: nothing is run).
``latest-rank0.pt`` is a link to the newest, which the manifest records as a link. Composer loads
these files with a full unpickler, so they are held to a trust policy of exactly the harmless
classes it writes (``format.trust``). A checkpoint saved with ``save_weights_only=True`` holds no
optimizer or scheduler state, which is said.
"""

from __future__ import annotations

import re
from pathlib import Path

from aptbundle.format.manifest import CheckpointEntry
from aptbundle.layouts import Found, FrameworkPickle, fields

LAYOUT, TITLE = "composer", "Composer"
_CKPT = re.compile(r"^((?:[^/]+/)*)ep(\d{1,9})-ba(\d{1,12})-rank0\.pt$")


def recognise(root: Path, files: list[str]) -> Found | None:
    found = [(rel, int(m.group(2)), int(m.group(3))) for rel in files if (m := _CKPT.match(rel))]
    if not found:
        return None
    out = Found(LAYOUT, TITLE)
    for rel, epoch, batch in found:
        name = rel.rsplit("/", 1)[-1][:-len("-rank0.pt")]
        state = _state(root / rel)
        stamp = fields(fields(state.get("timestamp")).get("Timestamp"))
        if type(stamp.get("batch")) is int and 0 <= stamp["batch"] < 2 ** 53:
            batch = stamp["batch"]
        out.checkpoints.append(CheckpointEntry(name, batch, epoch, {}, rel))
        if state:
            gone = [part for part, key in (("optimizer", "optimizers"), ("scheduler", "schedulers"))
                    if key not in state]  # save_weights_only=True keeps the model alone
            if gone:
                out.missing[name] = gone
    names = [c.name for c in out.checkpoints]
    if len(set(names)) != len(names):  # the same checkpoint name in two folders: named by path
        out.checkpoints = [CheckpointEntry(c.folder[:-len("-rank0.pt")].replace("/", "_"), c.step, c.epoch, {},
                                           c.folder) for c in out.checkpoints]
    out.history.append({"framework": TITLE, "checkpoints": len(found)})
    return out


def _state(path: Path) -> dict:
    with FrameworkPickle(path) as fp:
        return fields(fields(fp.data).get("state"))


def resume_call(run: str, checkpoint: CheckpointEntry | None) -> str:
    where = f"{run}/{checkpoint.folder}" if checkpoint else f"{run}/latest-rank0.pt"
    return f'Trainer(..., load_path="{where}").fit()'

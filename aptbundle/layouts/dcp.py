"""``torch.distributed.checkpoint`` folders (torchtitan's ``checkpoint/step-N`` among them): a
``.metadata`` pickle beside ``*.distcp`` files. Each such folder is a checkpoint, its step the
number in its name; a folder that is one DCP checkpoint at its top has no checkpoints of its
own (it is the checkpoint). ``.metadata`` is scanned with DCP's plain metadata classes (and
the ``pathlib`` path a default ``dcp.save`` records) allowed.
"""

from __future__ import annotations

from pathlib import Path

from aptbundle.format.manifest import CheckpointEntry
from aptbundle.layouts import Found, folder_checkpoints

LAYOUT, TITLE = "dcp", "torch.distributed.checkpoint"


def recognise(root: Path, files: list[str]) -> Found | None:
    def parent(rel: str) -> str:
        return rel.rsplit("/", 1)[0] if "/" in rel else ""

    meta = {parent(rel) for rel in files if rel.rsplit("/", 1)[-1] == ".metadata"}
    folders = sorted(meta & {parent(rel) for rel in files if rel.endswith(".distcp")})
    if not folders:
        return None
    out = Found(LAYOUT, TITLE, folder_checkpoints(folders))
    out.history.append({"framework": TITLE, "checkpoints": len(folders)})
    return out


def resume_call(run: str, checkpoint: CheckpointEntry | None) -> str:
    where = f"{run}/{checkpoint.folder}" if checkpoint else run
    return f'dcp.load(state_dict, checkpoint_id="{where}")'

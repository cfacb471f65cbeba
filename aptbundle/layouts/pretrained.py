"""A ``save_pretrained`` folder (transformers, diffusers, sentence-transformers): ``config.json``
and the weights (``model.safetensors``, shards with their index, or ``pytorch_model.bin``) at the
top. It is a model, not a training state: there is nothing to resume, only to load.
"""

from __future__ import annotations

import re
from pathlib import Path

from aptbundle.format.manifest import CheckpointEntry
from aptbundle.layouts import Found

LAYOUT, TITLE = "save-pretrained", "save_pretrained model"
_WEIGHTS = re.compile(r"^(model|pytorch_model|diffusion_pytorch_model|adapter_model)"
                      r"(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$")


def recognise(root: Path, files: list[str]) -> Found | None:
    top = {f for f in files if "/" not in f}
    if "config.json" in top or "adapter_config.json" in top:
        if any(_WEIGHTS.match(f) for f in top):
            return Found(LAYOUT, TITLE, history=[{"framework": TITLE}])
    return None


def resume_call(run: str, checkpoint: CheckpointEntry | None) -> str:
    return f'AutoModel.from_pretrained("{run}")  # a model, not a training state: load it, there is nothing to resume'

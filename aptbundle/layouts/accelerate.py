"""``accelerate``'s ``save_state`` folders: ``random_states_N.pkl`` beside the model and optimizer.

With ``ProjectConfiguration(automatic_checkpoint_naming=True)`` they are
``checkpoints/checkpoint_K``; any folder holding ``random_states_0.pkl`` is one. accelerate
records no step or loss in a readable file, so a checkpoint's step is the number in its name.
``random_states_N.pkl`` is loaded with ``weights_only`` plus numpy's RNG classes
(``format.trust``).
"""

from __future__ import annotations

import re
from pathlib import Path

from aptbundle.format.manifest import CheckpointEntry
from aptbundle.layouts import Found, folder_checkpoints

LAYOUT, TITLE = "accelerate", "accelerate (save_state)"
_RNG = re.compile(r"^(?:(.+)/)?random_states_0\.pkl$")


def recognise(root: Path, files: list[str]) -> Found | None:
    folders = [m.group(1) or "" for rel in files if (m := _RNG.match(rel))]
    if not folders:
        return None
    out = Found(LAYOUT, TITLE, folder_checkpoints(folders))
    out.history.append({"framework": TITLE, "states": len(folders)})
    return out


def resume_call(run: str, checkpoint: CheckpointEntry | None) -> str:
    where = f"{run}/{checkpoint.folder}" if checkpoint else run
    return f'accelerator.load_state("{where}")'

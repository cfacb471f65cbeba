"""``accelerate``'s ``save_state`` folders: ``random_states_N.pkl`` beside the model and optimizer.

With ``ProjectConfiguration(automatic_checkpoint_naming=True)`` they are
``checkpoints/checkpoint_K``; any folder holding ``random_states_0.pkl`` is one. a
checkpoint's step is the ``step`` that ``save_state`` records in ``random_states_0.pkl`` (read by
the scan engine), or the number in its name when that is unreadable.
``random_states_N.pkl`` is loaded with ``weights_only`` plus numpy's RNG classes
(``format.trust``).
"""

from __future__ import annotations

import re
from pathlib import Path

from aptbundle.format.manifest import CheckpointEntry
from aptbundle.layouts import Found, FrameworkPickle, fields, folder_checkpoints, lacking

LAYOUT, TITLE = "accelerate", "accelerate (save_state)"
_RNG = re.compile(r"^(?:(.+)/)?random_states_0\.pkl$")
_NUMBER = re.compile(r"(?:^|/)checkpoint_(\d{1,9})$")  # automatic_checkpoint_naming's folders


def recognise(root: Path, files: list[str]) -> Found | None:
    folders = [m.group(1) or "" for rel in files if (m := _RNG.match(rel))]
    if not folders:
        return None
    out = Found(LAYOUT, TITLE, folder_checkpoints(folders))
    for c in out.checkpoints:
        folder = c.folder
        step = _step(root / folder / "random_states_0.pkl")  # what save_state recorded, not the folder's number
        if step:  # accelerate counts steps in accumulate(); 0 says it was not asked to
            c.step = step
        inside = {rel[len(folder) + 1:] for rel in files if rel.startswith(folder + "/")}
        gone = lacking(inside, {"optimizer": ("optimizer",)})
        if gone:
            out.missing[c.name] = gone
    out.history.append({"framework": TITLE, "states": len(folders)})
    return out


def _step(path: Path) -> int | None:
    """The ``step`` accelerate saves in ``random_states_0.pkl`` (read by the scan engine)."""
    with FrameworkPickle(path) as fp:
        step = fields(fp.data).get("step")
    return step if type(step) is int and 0 <= step < 2 ** 53 else None


def resume_call(run: str, checkpoint: CheckpointEntry | None) -> str:
    where = f"{run}/{checkpoint.folder}" if checkpoint else run
    call = f'accelerator.load_state("{where}")'
    number = _NUMBER.search(checkpoint.folder) if checkpoint else None
    if number:  # automatic naming counts on from the iteration: the next save must not overwrite this one
        call += f"; accelerator.project_configuration.iteration = {int(number.group(1)) + 1}"
    return call

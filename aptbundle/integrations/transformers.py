"""The Hugging Face ``Trainer``: back its ``output_dir`` up to a store after each save.

::

    trainer = Trainer(..., callbacks=[AptbundleCallback("s3://bucket/runs")])
    trainer.train(resume_from_checkpoint=restore("s3://bucket/runs", "run1", args.output_dir))

``on_save`` comes after the Trainer wrote the checkpoint and rotated old ones out
(``save_total_limit``): the folder is taken as it is then (hard links) and pushed in the
background, best checkpoint and all. SIGTERM or SIGINT asks the Trainer to save at the end of the
current step and stop; after the final push the process exits 143 (or 130). Only the main
process pushes.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from aptbundle.integrations.live import LiveBackup, Preemption
from aptbundle.integrations.live import restore as _restore

__all__ = ["AptbundleCallback", "restore"]


class AptbundleCallback(TrainerCallback):
    """Push the Trainer's ``output_dir`` to ``store`` after each save (``name``: the run's name in
    the store, by default the folder's; ``sign``: a private key file)."""

    def __init__(self, store: str | Path, *, name: str | None = None, sign: str | Path | None = None):
        self.store, self.name, self.sign = store, name, sign
        self.backup: LiveBackup | None = None
        self.preemption = Preemption()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.backup = LiveBackup(self.store, args.output_dir, name=self.name, sign=self.sign)
        self.preemption.install()

    def on_step_end(self, args, state, control, **kwargs):
        if self.preemption.requested:  # save at the end of this step, then stop
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.backup is not None:
            self.backup.saved()

    def on_train_end(self, args, state, control, **kwargs):
        self.preemption.uninstall()
        if self.backup is not None:
            self.backup.saved()  # the state at the end (a stop between saves left nothing newer)
            self.backup.close()
        self.preemption.exit_if_requested()


def restore(store: str | Path, name: str, output_dir: str | Path, *, trust: list[str | Path] | None = None) -> str | None:
    """The newest pushed version of run ``name`` into ``output_dir``; the checkpoint folder to
    pass to ``trainer.train(resume_from_checkpoint=...)``, or None (start fresh)."""
    return _restore(store, name, output_dir, trust=trust)

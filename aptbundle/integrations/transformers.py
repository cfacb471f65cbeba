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

from aptbundle.integrations.live import Protection
from aptbundle.integrations.live import restore as _restore

__all__ = ["AptbundleCallback", "restore"]


class AptbundleCallback(Protection, TrainerCallback):
    """Push the Trainer's ``output_dir`` to ``store`` after each save (``name``: the run's name in
    the store, by default the folder's; ``sign``: a private key file)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start(args.output_dir, state.is_world_process_zero)

    def on_step_end(self, args, state, control, **kwargs):
        if self.preemption.requested:  # save at the end of this step, then stop
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.backup is not None:
            self.backup.saved()

    def on_train_end(self, args, state, control, **kwargs):
        self.finish()


def restore(store: str | Path, name: str, output_dir: str | Path, *, trust: list[str | Path] | None = None) -> str | None:
    """The newest pushed version of run ``name`` into ``output_dir``; the checkpoint folder to
    pass to ``trainer.train(resume_from_checkpoint=...)``, or None (start fresh)."""
    return _restore(store, name, output_dir, trust=trust)

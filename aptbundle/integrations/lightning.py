"""PyTorch Lightning: back a run's folder up to a store after each checkpoint Lightning writes.

::

    trainer = L.Trainer(..., default_root_dir="runs/run1", callbacks=[AptbundleCallback("s3://bucket/runs")])
    trainer.fit(model, ckpt_path=restore("s3://bucket/runs", "run1", "runs/run1"))

A ``Callback``, because that is what a Lightning user adds in one line; but it listens where
Lightning writes: it wraps the strategy's ``CheckpointIO`` when fitting starts, so it hears of
each ``.ckpt`` once the file is complete (a callback's own ``on_save_checkpoint`` runs before the
file exists). The folder backed up is ``default_root_dir``. SIGTERM or SIGINT saves a checkpoint
at the end of the current batch, stops, pushes, and exits 143 (or 130). Only the global-zero
process pushes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io.checkpoint_plugin import CheckpointIO

from aptbundle.integrations.live import LiveBackup, Protection
from aptbundle.integrations.live import restore as _restore
from aptbundle.layouts.lightning import checkpoint_state

__all__ = ["AptbundleCallback", "restore"]


class _Notifying(CheckpointIO):
    """The strategy's own ``CheckpointIO``, telling the backup after each file it wrote."""

    def __init__(self, inner: CheckpointIO, backup: LiveBackup):
        self.inner, self.backup = inner, backup

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        self.backup.saved()

    def load_checkpoint(self, path, map_location: Any | None = None, **kwargs) -> dict[str, Any]:
        return self.inner.load_checkpoint(path, map_location=map_location, **kwargs)

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


class AptbundleCallback(Protection, Callback):
    """Push ``default_root_dir`` to ``store`` after each checkpoint (``name``: the run's name in
    the store, by default the folder's; ``sign``: a private key file)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start(trainer.default_root_dir, trainer.is_global_zero)
        strategy = trainer.strategy
        if self.backup is not None and not isinstance(strategy.checkpoint_io, _Notifying):
            strategy.checkpoint_io = _Notifying(strategy.checkpoint_io, self.backup)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.preemption.requested and not trainer.should_stop:
            cb = trainer.checkpoint_callback
            folder = cb.dirpath if cb is not None and cb.dirpath else os.path.join(trainer.default_root_dir, "checkpoints")
            trainer.save_checkpoint(os.path.join(folder, f"epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt"))
            trainer.should_stop = True

    def on_fit_end(self, trainer, pl_module) -> None:
        self.finish()


def _newest_ckpt(run) -> str | None:
    ckpts = [f.path for f in run.manifest.files if f.path.endswith(".ckpt")]
    ckpts += [x.path for x in run.manifest.links if x.path.endswith(".ckpt")]
    best = max(ckpts, key=lambda rel: (checkpoint_state(run.path / rel).get("global_step", -1), rel), default=None)
    return str(run.path / best) if best else None


def restore(store: str | Path, name: str, output_dir: str | Path, *, trust: list[str | Path] | None = None) -> str | None:
    """The newest pushed version of run ``name`` into ``output_dir``; the ``.ckpt`` to pass to
    ``trainer.fit(model, ckpt_path=...)`` (the one with the highest step), or None (start fresh)."""
    return _restore(store, name, output_dir, trust=trust, pick=_newest_ckpt)

"""The APT-facing checkpoint API: a thin adapter over ``aptbundle.Checkpointer``.

``CheckpointManager(save_dir)`` keeps the familiar ``save_checkpoint`` / ``load_checkpoint``
calls, but writes a portable aptbundle run: safetensors weights, full optimizer, scheduler and
RNG state, a manifest with hashes. ``load_model(path)`` rebuilds ``(model, tokenizer, config)``
from a run or a checkpoint folder, for inference or fine-tuning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from aptbundle import MODEL_FILE, CheckpointError, Checkpointer, Run, checkpoint_name, verify_checkpoint
from apt_model.config import APTConfig
from apt_model.model import APTModel
from apt_model.tokenizer import CharTokenizer
from apt_model.training.setup import CONFIG_FILE, TOKENIZER_DIR, TRAINER_NAME


class CheckpointManager:
    """Save and load APT checkpoints into an aptbundle run at ``save_dir``.

    For example::

        cm = CheckpointManager("outputs/run1")
        cm.save_checkpoint(model, opt, sched, epoch=1, global_step=100, loss_history=[...])
        epoch, step, losses, metrics = cm.load_checkpoint(model, opt, sched)
    """

    def __init__(self, save_dir: str | Path, keep_last: int | None = None):
        path = Path(save_dir)
        self.run = Run.open(path) if Run.is_run(path) else Run.create(path, trainer=TRAINER_NAME)
        self.keep_last = keep_last

    def save_checkpoint(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        epoch: int, global_step: int, loss_history: list[float], metrics: dict | None = None,
                        tokenizer: CharTokenizer | None = None, config: APTConfig | None = None,
                        is_best: bool = False) -> Path:
        """Write ``checkpoints/step-NNNNNNNN/`` (and config/tokenizer when given); return its folder."""
        files: dict[str, bytes] = {}
        if config is not None:
            files[CONFIG_FILE] = config.to_json().encode("utf-8")
        if tokenizer is not None:
            files.update({f"{TOKENIZER_DIR}/{k}": v for k, v in tokenizer.files().items()})
        metrics = dict(metrics or {})
        if "loss" not in metrics and loss_history:
            metrics["loss"] = float(loss_history[-1])
        ckpt = Checkpointer(self.run, model=model, optimizer=optimizer, scheduler=scheduler, keep_last=self.keep_last)
        with self.run.writer():
            entry = ckpt.save(step=global_step, epoch=epoch, metrics=metrics, run_files=files, is_best=is_best or None,
                              trainer_state={"global_step": global_step, "loss_history": list(loss_history),
                                             "metrics": metrics})
        return self.run.checkpoint_dir(entry.name)

    def load_checkpoint(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                        scheduler: Any = None, checkpoint_path: str | Path | None = None,
                        map_location: str = "cpu") -> tuple[int, int, list[float], dict]:
        """Restore from ``checkpoint_path`` (a checkpoint folder or name; default latest).

        Returns ``(epoch, global_step, loss_history, metrics)``.
        """
        which = "latest" if checkpoint_path is None else Path(checkpoint_path).name
        ckpt = Checkpointer(self.run, model=model, optimizer=optimizer, scheduler=scheduler)
        state = ckpt.load(which, map_location=map_location)
        return (state.get("epoch", 0), state.get("global_step", state.get("step", 0)),
                state.get("loss_history", []), state.get("metrics", {}))

    def checkpoint_path(self, global_step: int) -> Path:
        return self.run.checkpoint_dir(checkpoint_name(global_step))


def load_model(path: str | Path, *, which: str = "best", device: str = "cpu"
               ) -> tuple[APTModel, CharTokenizer, APTConfig]:
    """``(model, tokenizer, config)`` from a run folder (its ``which`` checkpoint) or a checkpoint folder.

    For example::

        model, tok, cfg = load_model("outputs/run1")
    """
    p = Path(path)
    if Run.is_run(p):
        run = Run.open(p)
        which = which if (which != "best" or run.best) else "latest"
    elif (p / MODEL_FILE).exists() and Run.is_run(p.parent.parent):
        run, which = Run.open(p.parent.parent), p.name
    else:
        raise CheckpointError(f"{path}: neither a run nor a checkpoint folder of one; expected a folder with"
                              " aptrun.json or a checkpoints/step-N folder inside a run")
    verified = verify_checkpoint(run, which)
    cfg = APTConfig.load(run.path / CONFIG_FILE)
    tok = CharTokenizer.load(run.path / TOKENIZER_DIR)
    model = APTModel(cfg).to(device)
    Checkpointer(run, model=model).load(verified, restore_rng=False)
    return model.eval(), tok, cfg

"""The training loop: one session over a run, readable top to bottom (``Trainer.fit``).

``trainer.train`` creates a run (or continues one) and runs ``Trainer.fit``: AdamW
with warm-up and cosine decay, gradient clipping, a metrics line per step in
``logs/metrics.jsonl``, and complete checkpoints through ``aptbundle.Checkpointer``. Every RNG
training touches is saved and the data position is a number, so stopping at any step and
resuming gives the same weights, optimizer state and loss history as a run that never stopped
(same hardware kind, torch version and thread count). SIGINT/SIGTERM finish the current step,
save and stop.
"""

from __future__ import annotations

import enum
import json
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aptbundle import METRICS_FILE, Checkpointer, progress, unwrap
from apt_model.training.distributed import Dist
from apt_model.training.setup import Session, log

LOSS_WINDOW = 20


class SaveReason(enum.Enum):
    """Why a checkpoint is written after a step."""

    STOP_AT_STEP = "stop-at-step"
    SIGNAL = "signal"
    EVERY = "save-every"
    EPOCH = "epoch"
    END = "end"

    @property
    def stops(self) -> bool:
        return self in (SaveReason.STOP_AT_STEP, SaveReason.SIGNAL)


@dataclass
class TrainResult:
    """What a training session did."""

    run_dir: Path
    global_step: int
    epoch: int
    finished: bool
    losses: list[float] = field(default_factory=list)
    last_checkpoint: str | None = None
    stopped_by: int | None = None  # the signal that stopped the session, if one did


class StopRequest:
    """Turns SIGINT/SIGTERM into a request to save and stop after the current step."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
                if s:
                    self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second signal: the user really wants out now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


@torch.no_grad()
def evaluate(s: Session) -> float | None:
    """Mean validation loss (eval mode: no dropout, no RNG drawn)."""
    if len(s.val_blocks) == 0:
        return None
    model = unwrap(s.model)  # the plain module: no DDP collectives in evaluation
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(s.val_blocks), s.cfg.batch_size):
        b = s.val_blocks[i: i + s.cfg.batch_size].to(s.device)
        _, loss = model(b[:, :-1], b[:, 1:])
        total += loss.item() * len(b)
        n += len(b)
    s.model.train()
    return total / n


class Trainer:
    """One training session over a run: the loop, the metrics log and the checkpoints."""

    def __init__(self, s: Session, ckpt: Checkpointer, d: Dist, *, state: dict | None, quiet: bool):
        self.s, self.ckpt, self.d, self.quiet = s, ckpt, d, quiet
        state = state or {}
        self.global_step = int(state.get("global_step", 0))
        self.epoch = int(state.get("epoch", 0))
        self.position = int(state.get("position", 0))  # batches of this epoch already done
        self.losses: list[float] = list(state.get("loss_history", []))
        self.log_lines = self._read_log(self.global_step)
        self.last_saved: str | None = None
        self._val: tuple[int, float | None] | None = None  # (step, validation loss) evaluated last

    def fit(self, stop_at_step: int | None = None) -> TrainResult:
        """Train to the planned number of epochs (or ``stop_at_step``); save as configured."""
        s, cfg = self.s, self.s.cfg
        if self.epoch >= cfg.epochs or (stop_at_step is not None and self.global_step >= stop_at_step):
            log(self.quiet, f"{s.run.name}: already at step {self.global_step}, epoch {self.epoch} of"
                             f" {cfg.epochs}; nothing to train (use --epochs N for a longer run)")
            return self._result(self.epoch >= cfg.epochs)
        self.ckpt.start_session(device=s.device.type, start_step=self.global_step, planned_epochs=cfg.epochs)
        s.model.train()
        with StopRequest() as stop, progress("training", self.quiet or not self.d.is_main, s.total_steps) as bar:
            if bar:
                bar(self.global_step)
            while self.epoch < cfg.epochs:
                for batch in s.sampler.batches(self.epoch, self.position):
                    loss = self.train_step(batch)
                    if bar:
                        bar(1, f"step {self.global_step} loss {loss:.4f}")
                    if self.position == 0 or (cfg.eval_every and self.global_step % cfg.eval_every == 0):
                        self.log_validation()
                    reason = self.save_reason(stop, stop_at_step)
                    if reason is not None:
                        self.save(reason, stop)
                    if reason is not None and reason.stops:
                        return self._stopped(reason, stop)
                    if self.position == 0:  # the epoch is over: the sampler's order changes
                        break
        if self.last_saved != self._name_at(self.global_step):
            self.save(SaveReason.END, None)
        return self._result(True)

    def train_step(self, idx: torch.Tensor) -> float:
        """One optimisation step on the batch ``idx``; returns its loss (mean over ranks)."""
        s = self.s
        batch = s.train_blocks[idx].to(s.device)
        _, loss = s.model(batch[:, :-1], batch[:, 1:])
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.cfg.grad_clip)
        s.optimizer.step()
        s.scheduler.step()
        self.global_step += 1
        self.position += 1
        value = self.d.mean(loss.item())
        self.losses.append(value)
        if self.position == s.sampler.num_batches():
            self.epoch, self.position = self.epoch + 1, 0
        if self.global_step % s.cfg.log_every == 0:
            self.log_lines.append((json.dumps({
                "step": self.global_step, "epoch": self.epoch, "loss": value,
                "lr": s.scheduler.get_last_lr()[0]}) + "\n").encode())
        return value

    def log_validation(self) -> float | None:
        """Evaluate once for this step and add a ``val_loss`` line to the metrics log."""
        if self._val is None or self._val[0] != self.global_step:
            self._val = (self.global_step, evaluate(self.s))
            if self._val[1] is not None:
                self.log_lines.append((json.dumps({"step": self.global_step, "epoch": self.epoch,
                                                   "val_loss": self._val[1]}) + "\n").encode())
        return self._val[1]

    def save_reason(self, stop: StopRequest, stop_at_step: int | None) -> SaveReason | None:
        """Why to checkpoint after this step, or None."""
        cfg = self.s.cfg
        if stop_at_step is not None and self.global_step >= stop_at_step:
            return SaveReason.STOP_AT_STEP
        if self.d.any(stop.signal is not None):
            return SaveReason.SIGNAL
        if cfg.save_every and self.global_step % cfg.save_every == 0:
            return SaveReason.EVERY
        if self.position == 0 and (self.epoch % cfg.save_freq == 0 or self.epoch == cfg.epochs):
            return SaveReason.EPOCH
        return None

    def save(self, reason: SaveReason, stop: StopRequest | None) -> None:
        """Checkpoint the current state, with the metrics log, in one commit."""
        s = self.s
        window = self.losses[-LOSS_WINDOW:]
        metrics = {"loss": sum(window) / len(window), "lr": s.scheduler.get_last_lr()[0]} if window else \
            {"lr": s.scheduler.get_last_lr()[0]}
        val = self._val[1] if self._val and self._val[0] == self.global_step else evaluate(s)
        if val is not None:
            metrics["val_loss"] = val
        state = {"global_step": self.global_step, "position": self.position, "world_size": self.d.world,
                 "sharded": self.ckpt.mode == "sharded",
                 "samples_seen": self.global_step * s.cfg.batch_size * s.sampler.world,
                 "steps_per_epoch": s.sampler.num_batches(), "total_steps": s.total_steps,
                 "planned_epochs": s.cfg.epochs, "loss_history": self.losses, "metrics": metrics}
        label = reason.value if reason is not SaveReason.SIGNAL else f"signal {self._signal_name(stop)}"
        entry = self.ckpt.save(step=self.global_step, epoch=self.epoch, trainer_state=state, metrics=metrics,
                               run_files={METRICS_FILE: b"".join(self.log_lines)}, device=s.device.type,
                               reason=label)
        self.last_saved = entry.name
        log(self.quiet, f"saved {s.run.name}/checkpoints/{entry.name} (step {self.global_step}, epoch"
                         f" {self.epoch}, loss {metrics.get('loss', float('nan')):.4f}"
                         + (f", val {val:.4f})" if val is not None else ")"))

    # -- helpers ---------------------------------------------------------------------------
    def _read_log(self, upto: int) -> list[bytes]:
        """Metrics lines up to the restored step: later ones belong to a lost future."""
        path = self.s.run.path / METRICS_FILE
        if not path.exists():
            return []
        keep = []
        for line in path.read_bytes().splitlines():
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                continue
            step = row.get("step") if isinstance(row, dict) else None
            if type(step) is int and step <= upto:  # the log came with the run: skip what is not a step
                keep.append(line + b"\n")
        return keep

    @staticmethod
    def _signal_name(stop: StopRequest | None) -> str:
        return signal.Signals(stop.signal if stop and stop.signal else signal.SIGTERM).name

    @staticmethod
    def _name_at(step: int) -> str:
        return f"step-{step:08d}"

    def _stopped(self, reason: SaveReason, stop: StopRequest) -> TrainResult:
        result = self._result(False)
        if reason is SaveReason.SIGNAL:
            result.stopped_by = stop.signal or signal.SIGTERM
            log(self.quiet, f"stopped by {self._signal_name(stop)} at step {self.global_step};"
                            f" continue with `aptbundle resume {self.s.run.path}`")
        return result

    def _result(self, finished: bool) -> TrainResult:
        self.ckpt.wait()  # a background save must be complete before the session ends
        return TrainResult(self.s.run.path, self.global_step, self.epoch, finished, self.losses, self.last_saved)

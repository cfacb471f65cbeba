"""Train an APT model into an aptbundle run, and continue such a run bit-exactly.

``train`` creates a run (or continues one with ``resume_from``) and runs ``Trainer.fit``: AdamW
with warm-up and cosine decay, gradient clipping, a metrics line per step in
``logs/metrics.jsonl``, and complete checkpoints through ``aptbundle.Checkpointer``. Every RNG
training touches is saved and the data position is a number, so stopping at any step and
resuming gives the same weights, optimizer state and loss history as a run that never stopped
(same hardware kind, torch version and thread count). SIGINT/SIGTERM finish the current step,
save and stop.

Command line: ``python -m apt_model.training.trainer --run-dir outputs/run1 --epochs 2``.
"""

from __future__ import annotations

import contextlib
import enum
import json
import signal
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch

from aptbundle import Checkpointer, Run, VerifiedCheckpoint
from aptbundle.commands.exits import CONTEXT, Command
from aptbundle.commands.progress import progress
from aptbundle.state.checkpoint import unwrap, verify_on_main
from apt_model.config import APTConfig, preset
from apt_model.errors import TrainingError
from apt_model.training.distributed import Dist
from apt_model.training.setup import (Session, build, locate, log, new_run, pick_device, reopen_run, verify_run_files,
                                      warn_environment)

METRICS_FILE = "logs/metrics.jsonl"
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
    stopped_by: str | None = None  # the signal's name, when one stopped the session


class StopRequest:
    """Turns SIGINT/SIGTERM into a request to save and stop after the current step."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
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
        self.log_lines = self._readlog(self.global_step)
        self.last_saved: str | None = None

    def fit(self, stop_at_step: int | None = None) -> TrainResult:
        """Train to the planned number of epochs (or ``stop_at_step``); save as configured."""
        s, cfg = self.s, self.s.cfg
        if self.epoch >= cfg.epochs or (stop_at_step is not None and self.global_step >= stop_at_step):
            log(self.quiet, f"{s.run.name}: already at step {self.global_step}, epoch {self.epoch} of"
                             f" {cfg.epochs}; nothing to train (use --epochs N for a longer run)")
            return self._result(self.epoch >= cfg.epochs)
        self.ckpt.start_session(device=s.device.type, start_step=self.global_step)
        s.model.train()
        with StopRequest() as stop, progress("training", self.quiet or not self.d.is_main, s.total_steps) as bar:
            if bar:
                bar(self.global_step)
            while self.epoch < cfg.epochs:
                for batch in s.sampler.batches(self.epoch, self.position):
                    loss = self.train_step(batch)
                    if bar:
                        bar(1, f"step {self.global_step} loss {loss:.4f}")
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
        val = evaluate(s)
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
    def _readlog(self, upto: int) -> list[bytes]:
        """Metrics lines up to the restored step: later ones belong to a lost future."""
        path = self.s.run.path / METRICS_FILE
        if not path.exists():
            return []
        keep = []
        for line in path.read_bytes().splitlines():
            try:
                if json.loads(line).get("step", 0) <= upto:
                    keep.append(line + b"\n")
            except (ValueError, AttributeError):
                continue
        return keep

    @staticmethod
    def _signal_name(stop: StopRequest | None) -> str:
        return signal.Signals(stop.signal if stop and stop.signal else signal.SIGTERM).name

    @staticmethod
    def _name_at(step: int) -> str:
        return f"step-{step:08d}"

    def _stopped(self, reason: SaveReason, stop: StopRequest) -> TrainResult:
        by = None
        if reason is SaveReason.SIGNAL:
            by = self._signal_name(stop)
            log(self.quiet, f"stopped by {by} at step {self.global_step};"
                             f" continue with `aptbundle resume {self.s.run.path}`")
        result = self._result(False)
        result.stopped_by = by
        return result

    def _result(self, finished: bool) -> TrainResult:
        self.ckpt.wait()  # a background save must be complete before the session ends
        return TrainResult(self.s.run.path, self.global_step, self.epoch, finished, self.losses, self.last_saved)


# -- starting a session ------------------------------------------------------------------------
def train(config: APTConfig | None = None, run_dir: str | Path | None = None, *, model_size: str = "tiny",
          data: str | Path | None = None, resume_from: str | None = None, stop_at_step: int | None = None,
          device: str = "auto", allow_data_change: bool = False, quiet: bool = False,
          async_save: bool = False, sharded: bool = False, checkpoint: VerifiedCheckpoint | None = None,
          **overrides) -> TrainResult:
    """Train a new run or continue one (in one process, or in each of ``torchrun``'s).

    ``overrides`` are APTConfig fields (``epochs``, ``batch_size``, ``lr``, ``seed``, ``save_every``,
    ``save_freq``, ``keep_last``...); None values are ignored. ``async_save`` writes checkpoints
    in a background thread (the training thread only copies the state); ``sharded`` saves model
    and optimizer with torch.distributed.checkpoint, which reshards when the number of
    processes changes. ``checkpoint`` is one already verified by the caller (``aptbundle resume``).

    >>> # train(run_dir="outputs/run1", model_size="tiny", epochs=2, quiet=True).finished
    True
    """
    dev = pick_device(device)
    d = Dist.from_env(dev)
    if d.enabled and dev.type == "cuda":
        dev = torch.device("cuda", d.local_rank)
    if async_save and (d.enabled or sharded):
        raise TrainingError("--async-save works in one process without --sharded; drop one of them")
    try:
        return _train(d, dev, config, run_dir, model_size, data, resume_from, stop_at_step, allow_data_change,
                      quiet or not d.is_main, "async" if async_save else "sharded" if sharded else "sync",
                      checkpoint, {k: v for k, v in overrides.items() if v is not None})
    finally:
        d.close()


def _train(d: Dist, dev: torch.device, config, run_dir, model_size, data, resume_from, stop_at_step,
           allow_data_change, quiet, mode, checkpoint, overrides) -> TrainResult:
    run_path = Path(run_dir) if run_dir is not None else None
    which = None
    if resume_from:
        run_path, which = locate(resume_from, run_path)
    elif run_path is None:
        raise TrainingError("--run-dir: required, the folder of the new run (for example outputs/run1)")
    else:
        cfg0 = (config or preset(model_size)).replace(**overrides)
        d.on_main(lambda: new_run(run_path, cfg0, data) and None)
    run = checkpoint.run if checkpoint is not None else Run.open(run_path)
    with run.writer() if d.is_main else contextlib.nullcontext():
        if which is not None and d.is_main:
            removed = run.recover()
            if removed:
                log(quiet, f"cleaned what an interrupted session left: {', '.join(removed)}")
        d.barrier()
        run.reload()
        if which == "latest" and run.latest is None:
            # killed before its first checkpoint: start again from the same seed, same result
            log(quiet, f"{run.name} has no checkpoint yet; training it from the start")
            which = None
            d.on_main(lambda: verify_run_files(run))
        elif which is not None and checkpoint is None:
            checkpoint = verify_on_main(run, which)  # the boundary: verified once, loaded once
        cfg, tok, text, changed = reopen_run(run, data, allow_data_change, overrides if which else {})
        if changed:
            log(quiet, "warning: training continues on different data (--allow-data-change)")
        if checkpoint is not None:
            warn_environment(run, dev, quiet)
            if checkpoint.has("dcp/.metadata"):
                mode = "sharded"  # a sharded run stays sharded
        torch.manual_seed(cfg.seed)
        session = build(run, cfg, tok, text, dev, d.rank, d.world)
        if d.enabled:  # same initial weights everywhere, then a dropout stream of each rank's own
            torch.manual_seed(cfg.seed * 1_000_003 + d.rank)
        ckpt = Checkpointer(run, model=session.model, optimizer=session.optimizer, scheduler=session.scheduler,
                            keep_last=cfg.keep_last, best_metric="loss", mode=mode)
        state = _restore(session, ckpt, checkpoint, d, allow_data_change, quiet) if checkpoint else None
        if d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            session.model = DDP(session.model, device_ids=[dev.index] if dev.type == "cuda" else None)
        try:
            return Trainer(session, ckpt, d, state=state, quiet=quiet).fit(stop_at_step)
        finally:
            ckpt.wait()
            session.model = unwrap(session.model)  # drop the DDP wrapper before the group goes


def _restore(s: Session, ckpt: Checkpointer, checkpoint: VerifiedCheckpoint, d: Dist,
             allow_data_change: bool, quiet: bool) -> dict:
    """Load model, optimizer, scheduler and this rank's RNG; carry the data position across a
    change in the number of processes."""
    # a rank the run never had keeps this stream of its own; the others get theirs restored
    torch.manual_seed(s.cfg.seed * 1_000_003 + d.rank + 7919 * (checkpoint.entry.step + 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = ckpt.load(checkpoint, map_location=s.device)
    for w in caught:
        log(quiet, f"warning: {w.message}")
    old_world = int(state.get("world_size", 1))
    if old_world != d.world:
        seen = int(state.get("position", 0)) * s.cfg.batch_size * old_world
        state["position"] = min(seen // (s.cfg.batch_size * d.world), s.sampler.num_batches() - 1)
        log(quiet, f"the run had {old_world} process(es), now {d.world}: continuing after {seen} samples"
                    f" of epoch {state.get('epoch')} (batch {state['position']})")
    elif state.get("steps_per_epoch") not in (None, s.sampler.num_batches()) and not allow_data_change:
        raise TrainingError(f"{s.run.name}: the data gives {s.sampler.num_batches()} steps per epoch,"
                            f" the run had {state['steps_per_epoch']}; pass --allow-data-change")
    log(quiet, f"resuming {s.run.name} from {checkpoint.name} (step {state.get('global_step')},"
                f" epoch {state.get('epoch')}) on {s.device.type}" + (f" x{d.world}" if d.enabled else ""))
    return state


def resume_run(run_dir: str | Path, *, which: str = "latest", checkpoint: VerifiedCheckpoint | None = None,
               epochs: int | None = None, stop_at_step: int | None = None, device: str = "auto",
               data: str | Path | None = None, allow_data_change: bool = False, quiet: bool = False) -> TrainResult:
    """The ``aptbundle.trainers`` entry point: continue ``run_dir`` to its planned length."""
    return train(run_dir=run_dir, resume_from=which, checkpoint=checkpoint, epochs=epochs,
                 stop_at_step=stop_at_step, device=device, data=data, allow_data_change=allow_data_change,
                 quiet=quiet)


# -- the command line ----------------------------------------------------------------------------
@click.command(cls=Command, context_settings=CONTEXT)
@click.option("--run-dir", "--checkpoint-dir", "run_dir", type=click.Path(file_okay=False),
              help="The run folder (created if new).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="APTConfig JSON file (fields not given keep the preset's values).")
@click.option("--model-size", type=click.Choice(["tiny", "small", "base"]), default="tiny", show_default=True,
              help="Model preset.")
@click.option("--data", type=click.Path(dir_okay=False), help="UTF-8 text corpus [default: the built-in corpus].")
@click.option("--epochs", type=int, help="Planned length in epochs [default: 2].")
@click.option("--batch-size", type=int, help="Sequences per step [default: the preset's].")
@click.option("--lr", type=float, help="Peak learning rate [default: the preset's].")
@click.option("--seed", type=int, help="Seeds weights, data order and dropout [default: 1234].")
@click.option("--save-every", type=int, help="Also checkpoint every N steps [default: 0, only at epoch ends].")
@click.option("--save-freq", type=int, help="Checkpoint every N epochs [default: 1].")
@click.option("--keep-last", type=int, help="Checkpoints kept besides best and latest [default: 3].")
@click.option("--stop-at-step", type=int, help="Save and stop once global step N is done.")
@click.option("--resume-from", help="latest, best, a checkpoint name, or a run/checkpoint path.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to train.")
@click.option("--allow-data-change", is_flag=True, help="Continue even if the data differs from the run's.")
@click.option("--async-save", is_flag=True, help="Write checkpoints in a background thread.")
@click.option("--sharded", is_flag=True,
              help="Save model and optimizer with torch.distributed.checkpoint (reshards on resume).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or messages.")
def main(run_dir, config_file, model_size, data, epochs, batch_size, lr, seed, save_every, save_freq, keep_last,
         stop_at_step, resume_from, device, allow_data_change, async_save, sharded, quiet) -> None:
    """Train an APT model into a portable aptbundle run."""
    config = preset(model_size).replace(**APTConfig.load(config_file).to_dict()) if config_file else None
    res = train(config, run_dir, model_size=model_size, data=data, resume_from=resume_from,
                stop_at_step=stop_at_step, device=device, allow_data_change=allow_data_change, quiet=quiet,
                async_save=async_save, sharded=sharded, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                save_every=save_every, save_freq=save_freq, keep_last=keep_last)
    log(quiet, f"{'finished' if res.finished else 'stopped'} at step {res.global_step}: {res.run_dir}")


if __name__ == "__main__":
    main()

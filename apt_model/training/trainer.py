"""Train an APT model into an aptbundle run, and continue such a run bit-exactly.

``train`` creates a run (or continues one with ``resume_from``), trains with AdamW, warm-up and
cosine decay and gradient clipping, logs per-step metrics to ``logs/metrics.jsonl`` and saves
complete checkpoints through ``aptbundle.checkpoint.CheckpointManager``. Every RNG it touches
is saved and the data position is a number, so stopping at any step and resuming gives the same
weights, optimizer state and loss history as a run that never stopped (same hardware kind,
torch version and thread count). SIGINT/SIGTERM finish the current step, save and exit cleanly.

Command line: ``python -m apt_model.training.trainer --run-dir outputs/run1 --epochs 2``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aptbundle.checkpoint import CheckpointManager, checkpoint_name, rng_file, rng_state, unwrap
from aptbundle.fsutil import TMP_PREFIX
from aptbundle.errors import AptBundleError, ResumeError
from aptbundle.run import Run, environment_info, now_iso
from apt_model.config import APTConfig, ConfigError, preset
from apt_model.training.distributed import DCP_DIR, Dist, is_sharded, load_sharded, save_sharded
from apt_model.training.setup import Session, build, new_run, pick_device, reopen_run
from apt_model.utils.cache_manager import CacheManager

METRICS_FILE = "logs/metrics.jsonl"
LOSS_WINDOW = 20


@dataclass
class TrainResult:
    """What a training session did."""

    run_dir: Path
    global_step: int
    epoch: int
    finished: bool
    losses: list[float] = field(default_factory=list)
    last_checkpoint: str | None = None


class _Stop:
    """Turns SIGINT/SIGTERM into a request to save and stop after the current step."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: the user really wants out now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _warn_environment(run: Run, device: torch.device, quiet: bool) -> None:
    """Resuming is exact only on the same torch, thread count and device kind: say when not."""
    was, now = run.manifest.environment, environment_info(device.type)
    for key, label in (("torch", "torch version"), ("threads", "thread count"), ("device", "device")):
        if key in was and was.get(key) != now.get(key):
            _log(quiet, f"warning: {label} differs: run written with {was.get(key)}, resuming with {now.get(key)};"
                        " the state is restored exactly, float rounding may differ")


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
    """One training session over a run (new or resumed)."""

    def __init__(self, s: Session, cm: CheckpointManager, *, state: dict | None, quiet: bool,
                 async_save: bool = False, dist: Dist | None = None, sharded: bool = False):
        self.s, self.cm, self.quiet = s, cm, quiet
        self.async_save, self.sharded = async_save, sharded
        self.d = dist or Dist()
        state = state or {}
        self.global_step = int(state.get("global_step", 0))
        self.epoch = int(state.get("epoch", 0))
        self.position = int(state.get("position", 0))
        self.losses: list[float] = list(state.get("loss_history", []))
        self.log_lines = self._read_log(self.global_step)
        self.last_saved: str | None = None

    def _read_log(self, upto: int) -> list[bytes]:
        """Metrics lines up to the restored step: later ones belong to a lost future."""
        path = self.s.run.path / METRICS_FILE
        if not path.exists():
            return []
        keep = []
        for line in path.read_bytes().splitlines():
            try:
                if json.loads(line).get("step", 0) <= upto:
                    keep.append(line + b"\n")
            except ValueError:
                continue
        return keep

    def save(self, reason: str) -> str:
        s = self.s
        window = self.losses[-LOSS_WINDOW:]
        metrics = {"loss": sum(window) / len(window) if window else float("nan"),
                   "lr": s.scheduler.get_last_lr()[0]}
        val = evaluate(s)
        if val is not None:
            metrics["val_loss"] = val
        state = {"global_step": self.global_step, "position": self.position, "world_size": self.d.world,
                 "sharded": self.sharded,
                 "samples_seen": self.global_step * s.cfg.batch_size * s.sampler.world,
                 "steps_per_epoch": s.sampler.num_batches(), "total_steps": s.total_steps,
                 "planned_epochs": s.cfg.epochs, "loss_history": self.losses, "metrics": metrics}
        hist = s.run.manifest.history
        hist[-1].update(stop_step=self.global_step, stopped_at=now_iso(), reason=reason)
        if metrics["loss"] != metrics["loss"]:
            metrics.pop("loss")
        common = dict(step=self.global_step, epoch=self.epoch, scheduler=s.scheduler, trainer_state=state,
                      metrics=metrics, run_files={METRICS_FILE: b"".join(self.log_lines)}, device=s.device.type)
        if not (self.d.enabled or self.sharded):
            entry = self.cm.save(model=s.model, optimizer=s.optimizer, background=self.async_save, **common)
        else:
            entry = self._save_collective(common)
        self.last_saved = entry.name
        _log(self.quiet, f"saved {s.run.name}/checkpoints/{entry.name} (step {self.global_step}, epoch"
                         f" {self.epoch}, loss {metrics.get('loss', float('nan')):.4f}"
                         + (f", val {val:.4f})" if val is not None else ")"))
        return entry.name

    def _save_collective(self, common: dict):
        """Every rank writes its RNG state (and, sharded, its DCP shards) into one staging
        folder; rank 0 adds the rest and commits it; all wait until the checkpoint is complete."""
        s, d = self.s, self.d
        stage = s.run.path / "checkpoints" / f"{TMP_PREFIX}{checkpoint_name(self.global_step)}-ranks"
        if d.is_main:
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir(parents=True)
        d.barrier()
        torch.save(rng_state(), stage / rng_file(d.rank))
        if self.sharded:
            save_sharded(stage / DCP_DIR, s.model, s.optimizer)
        d.barrier()
        entry = d.on_main(lambda: self.cm.save(
            model=None if self.sharded else s.model, optimizer=None if self.sharded else s.optimizer,
            rng=False, stage_dir=stage, **common))
        return entry

    def _step(self, idx: torch.Tensor) -> float:
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

    def _save_reason(self, stop: _Stop, stop_at_step: int | None) -> str | None:
        """Why to checkpoint after this step, or None."""
        cfg = self.s.cfg
        if stop_at_step is not None and self.global_step >= stop_at_step:
            return "stop-at-step"
        if self.d.any(stop.signal is not None):
            return f"signal {signal.Signals(stop.signal or signal.SIGTERM).name}"
        if cfg.save_every and self.global_step % cfg.save_every == 0:
            return "save-every"
        if self.position == 0 and (self.epoch % cfg.save_freq == 0 or self.epoch == cfg.epochs):
            return "epoch"
        return None

    def fit(self, stop_at_step: int | None = None) -> TrainResult:
        s, cfg = self.s, self.s.cfg
        if self.epoch >= cfg.epochs or (stop_at_step is not None and self.global_step >= stop_at_step):
            _log(self.quiet, f"{s.run.name}: already at step {self.global_step}, epoch {self.epoch} of"
                             f" {cfg.epochs}; nothing to train (use --epochs N for a longer run)")
            return self._result(self.epoch >= cfg.epochs)
        s.run.manifest.history.append({
            "started_at": now_iso(), "start_step": self.global_step, "stop_step": self.global_step,
            "processes": self.d.world, **environment_info(s.device.type)})
        s.model.train()
        bar = _Bar(s.total_steps, self.global_step, self.quiet)
        saved_at = None
        with _Stop() as stop:
            while self.epoch < cfg.epochs:
                for idx in s.sampler.batches(self.epoch, self.position):
                    value = self._step(idx)
                    bar.update(self.global_step, value)
                    reason = self._save_reason(stop, stop_at_step)
                    if reason:
                        bar.clear()
                        self.save(reason)
                        saved_at = self.global_step
                    if reason and reason.startswith(("stop", "signal")):
                        bar.close()
                        if reason.startswith("signal"):
                            _log(self.quiet, f"stopped by {reason[7:]} at step {self.global_step};"
                                             f" continue with `aptbundle resume {s.run.path}`")
                        return self._result(False)
                    if self.position == 0:  # the epoch is over: the sampler's order changes
                        break
        bar.close()
        if saved_at != self.global_step:
            self.save("end")
        return self._result(True)

    def _result(self, finished: bool) -> TrainResult:
        self.cm.wait()  # a background save must be complete before the session ends
        return TrainResult(self.s.run.path, self.global_step, self.epoch, finished, self.losses, self.last_saved)


class _Bar:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, total: int, start: int, quiet: bool):
        self.total, self.on = total, (not quiet) and sys.stderr.isatty()
        self.t0, self.start = time.time(), start

    def update(self, step: int, loss: float) -> None:
        if not self.on:
            return
        frac = step / max(1, self.total)
        rate = (step - self.start) / max(1e-9, time.time() - self.t0)
        print(f"\r[{'#' * int(frac * 30):<30}] {step}/{self.total} loss {loss:.4f} {rate:.1f} step/s",
              end="", file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self.on:
            print("\r\033[K", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.on:
            print(file=sys.stderr, flush=True)


def _locate(resume_from: str, run_dir: Path | None) -> tuple[Path, str]:
    """``latest``/``best``/a checkpoint name with ``run_dir``, or a path to a run or checkpoint."""
    if resume_from in ("latest", "best") or (run_dir is not None and not Path(resume_from).exists()):
        if run_dir is None:
            raise ResumeError(f"--resume-from {resume_from}: also give --run-dir")
        return run_dir, resume_from
    p = Path(resume_from)
    if Run.is_run(p):
        return p, "latest"
    if (p / "trainer_state.json").exists() and Run.is_run(p.parent.parent):
        return p.parent.parent, p.name
    raise ResumeError(f"--resume-from {resume_from}: expected latest, best, a run folder or a checkpoint folder")


def train(config: APTConfig | None = None, run_dir: str | Path | None = None, *, model_size: str = "tiny",
          data: str | Path | None = None, resume_from: str | None = None, stop_at_step: int | None = None,
          device: str = "auto", allow_data_change: bool = False, quiet: bool = False,
          async_save: bool = False, sharded: bool = False, **overrides) -> TrainResult:
    """Train a new run or continue one (in one process, or in each of ``torchrun``'s).

    ``overrides`` are APTConfig fields (``epochs``, ``batch_size``, ``lr``, ``seed``, ``save_every``,
    ``save_freq``, ``keep_last``...); None values are ignored. ``async_save`` writes checkpoints
    in a background thread (the training thread only copies the state); ``sharded`` saves model
    and optimizer with torch.distributed.checkpoint, which reshards when the number of
    processes changes.

    >>> # train(run_dir="outputs/run1", model_size="tiny", epochs=2, quiet=True).finished
    True
    """
    dev = pick_device(device)
    d = Dist.from_env(dev)
    if d.enabled and dev.type == "cuda":
        dev = torch.device("cuda", d.local_rank)
    quiet = quiet or not d.is_main
    if async_save and (d.enabled or sharded):
        raise ResumeError("--async-save works in one process without --sharded; drop one of them")
    try:
        return _train(d, config, run_dir, model_size, data, resume_from, stop_at_step, dev,
                      allow_data_change, quiet, async_save, sharded, overrides)
    finally:
        d.close()


def _train(d: Dist, config, run_dir, model_size, data, resume_from, stop_at_step, dev, allow_data_change,
           quiet, async_save, sharded, overrides) -> TrainResult:
    run_path = Path(run_dir) if run_dir is not None else None
    overrides = {k: v for k, v in overrides.items() if v is not None}
    which = None
    if resume_from:
        run_path, which = _locate(resume_from, run_path)
    elif run_path is None:
        raise ResumeError("--run-dir: required, the folder of the new run (for example outputs/run1)")
    else:
        cfg0 = (config or preset(model_size)).replace(**overrides)

        def create() -> None:
            torch.manual_seed(cfg0.seed)
            new_run(run_path, cfg0, data)

        d.on_main(create)
    run = Run.open(run_path)
    lock = run.lock() if d.is_main else contextlib.nullcontext()
    temp = CacheManager().session_temp(run.name) if not d.enabled else None
    with lock:
        try:
            if which is not None and d.is_main:
                removed = run.recover()
                if removed:
                    _log(quiet, f"cleaned what an interrupted session left: {', '.join(removed)}")
            d.barrier()
            run = Run.open(run_path)
            cfg, tok, text, changed = reopen_run(run, data, allow_data_change, overrides if which else {})
            if changed:
                _log(quiet, "warning: training continues on different data (--allow-data-change)")
            if which is not None:
                _warn_environment(run, dev, quiet)
            if which == "latest" and run.latest is None:
                # killed before its first checkpoint: start again from the same seed, same result
                _log(quiet, f"{run.name} has no checkpoint yet; training it from the start")
                which = None
            torch.manual_seed(cfg.seed)
            session = build(run, cfg, tok, text, dev, d.rank, d.world)
            if d.enabled:  # same initial weights everywhere, then a dropout stream of each rank's own
                torch.manual_seed(cfg.seed * 1_000_003 + d.rank)
            cm = CheckpointManager(run, keep_last=cfg.keep_last, best_metric="loss", temp_dir=temp)
            state = _restore(session, cm, which, d, dev, allow_data_change, quiet) if which else None
            sharded = sharded or bool(state and state.get("sharded"))  # a sharded run stays sharded
            if d.enabled:
                from torch.nn.parallel import DistributedDataParallel as DDP

                session.model = DDP(session.model, device_ids=[dev.index] if dev.type == "cuda" else None)
            trainer = Trainer(session, cm, state=state, quiet=quiet, async_save=async_save, dist=d,
                              sharded=sharded)
            try:
                return trainer.fit(stop_at_step)
            finally:
                cm.wait()
                session.model = unwrap(session.model)  # drop the DDP wrapper before the group goes
        finally:
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)


def _restore(s: Session, cm: CheckpointManager, which: str, d: Dist, dev: torch.device,
             allow_data_change: bool, quiet: bool) -> dict:
    """Load model, optimizer, scheduler and this rank's RNG; carry the data position across a
    change in the number of processes."""
    entry = s.run.resolve_checkpoint(which)
    ckpt = s.run.checkpoint_dir(entry.name)
    shard = is_sharded(ckpt)
    # a rank the run never had keeps this stream of its own; the others get theirs restored
    torch.manual_seed(s.cfg.seed * 1_000_003 + d.rank + 7919 * (entry.step + 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = cm.load(which, model=None if shard else s.model, optimizer=None if shard else s.optimizer,
                        scheduler=s.scheduler, map_location=dev, rank=d.rank)
        if shard:
            load_sharded(ckpt / DCP_DIR, s.model, s.optimizer, f"{entry.name}/{DCP_DIR}")
    for w in caught:
        _log(quiet, f"warning: {w.message}")
    old_world = int(state.get("world_size", 1))
    if old_world != d.world:
        seen = int(state.get("position", 0)) * s.cfg.batch_size * old_world
        state["position"] = min(seen // (s.cfg.batch_size * d.world), s.sampler.num_batches() - 1)
        _log(quiet, f"the run had {old_world} process(es), now {d.world}: continuing after {seen} samples"
                    f" of epoch {state.get('epoch')} (batch {state['position']})")
    elif state.get("steps_per_epoch") not in (None, s.sampler.num_batches()) and not allow_data_change:
        raise ResumeError(f"{s.run.name}: the data gives {s.sampler.num_batches()} steps per epoch,"
                          f" the run had {state['steps_per_epoch']}; pass --allow-data-change")
    _log(quiet, f"resuming {s.run.name} from {entry.name} (step {state.get('global_step')},"
                f" epoch {state.get('epoch')}) on {dev.type}" + (f" x{d.world}" if d.enabled else ""))
    return state


def resume_run(run_dir: str | Path, *, which: str = "latest", epochs: int | None = None,
               stop_at_step: int | None = None, device: str = "auto", data: str | Path | None = None,
               allow_data_change: bool = False, quiet: bool = False) -> TrainResult:
    """The ``aptbundle.trainers`` entry point: continue ``run_dir`` to its planned length."""
    return train(run_dir=run_dir, resume_from=which, epochs=epochs, stop_at_step=stop_at_step,
                 device=device, data=data, allow_data_change=allow_data_change, quiet=quiet)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m apt_model.training.trainer",
                                description="Train an APT model into a portable aptbundle run.")
    p.add_argument("--run-dir", "--checkpoint-dir", dest="run_dir", help="the run folder (created if new)")
    p.add_argument("--config", help="APTConfig JSON file (fields not given keep the preset's values)")
    p.add_argument("--model-size", default="tiny", choices=["tiny", "small", "base"])
    p.add_argument("--data", help="UTF-8 text corpus (default: the built-in sample corpus)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--save-every", type=int, help="also checkpoint every N steps")
    p.add_argument("--save-freq", type=int, help="checkpoint every N epochs")
    p.add_argument("--keep-last", type=int, help="checkpoints kept besides best and latest")
    p.add_argument("--stop-at-step", type=int, help="save and stop once global step N is done")
    p.add_argument("--resume-from", help="latest, best, a checkpoint name, or a run/checkpoint path")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--allow-data-change", action="store_true")
    p.add_argument("--async-save", action="store_true", help="write checkpoints in a background thread")
    p.add_argument("--sharded", action="store_true",
                   help="save model and optimizer with torch.distributed.checkpoint (reshards on resume)")
    p.add_argument("--quiet", "-q", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = None
        if args.config:
            config = preset(args.model_size).replace(**APTConfig.load(args.config).to_dict())
        res = train(config, args.run_dir, model_size=args.model_size, data=args.data,
                    resume_from=args.resume_from, stop_at_step=args.stop_at_step, device=args.device,
                    allow_data_change=args.allow_data_change, quiet=args.quiet, async_save=args.async_save,
                    sharded=args.sharded,
                    epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, seed=args.seed, save_every=args.save_every,
                    save_freq=args.save_freq, keep_last=args.keep_last)
    except (AptBundleError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions: the last complete checkpoint is untouched
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; the last complete checkpoint is intact."
              " Free space (or fix permissions) and resume with --resume-from latest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    status = "finished" if res.finished else "stopped"
    _log(args.quiet, f"{status} at step {res.global_step}: {res.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

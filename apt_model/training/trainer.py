"""Train an APT model into an aptbundle run, and continue such a run bit-exactly.

``train`` creates a run (or continues one with ``resume_from``), restores a verified checkpoint
and runs the loop (``loop.Trainer``). ``resume_run`` is the ``aptbundle.trainers`` entry point.

Command line: ``python -m apt_model.training.trainer --run-dir outputs/run1``. Values are checked
before anything is created (a bad one is misuse: exit status 2). A session stopped by Ctrl-C,
SIGTERM or SIGHUP saves first and exits 128 + the signal, so ``train && aptbundle pack`` never
packs a half-finished run. The last line names the run's digest and what to do next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import signal
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch

from aptbundle import (CONTEXT, Backup, Checkpointer, Command, ResumeRequest, ResumeResult, Run, VerifiedCheckpoint,
                       status_for, unwrap, verify_on_main)
from apt_model.config import PRESETS, APTConfig, preset
from apt_model.errors import TrainingError
from apt_model.training.distributed import Dist
from apt_model.training.loop import StopRequest, Trainer, TrainResult
from apt_model.training.setup import (Session, build, check_weights_fit, locate, log, new_run, pick_device,
                                      reopen_run, verify_run_files, warn_environment)

__all__ = ["TrainRequest", "TrainResult", "Trainer", "main", "resume_run", "train"]
SAVE_MODES = ("sync", "async", "sharded")


@dataclass(frozen=True)
class TrainRequest:
    """One training session, as asked: a new run, or one to continue."""

    run_dir: Path | None = None  # the run folder (created if new)
    config: APTConfig | None = None  # a new run's whole config (default: the model_size preset)
    model_size: str = "tiny"  # the preset of a new run without config
    data: str | Path | None = None  # a UTF-8 corpus (default: the built-in one)
    resume_from: str | None = None  # latest, best, a checkpoint name, or a run/checkpoint path
    stop_at_step: int | None = None  # save and stop once this global step is done
    device: str = "auto"  # auto, cpu or cuda
    allow_data_change: bool = False  # continue even if the data differs from the run's
    quiet: bool = False  # no progress bar or messages
    save_mode: str = "sync"  # sync, async (written in a background thread) or sharded (DCP)
    checkpoint: VerifiedCheckpoint | None = None  # the checkpoint to continue, already verified by the caller
    backup_to: str | None = None  # a store to push the run to after each checkpoint, and at the end
    overrides: dict[str, Any] = field(default_factory=dict)  # APTConfig fields (epochs, lr, ...), None left out

    def __post_init__(self) -> None:
        if self.save_mode not in SAVE_MODES:
            raise TrainingError(f"save_mode {self.save_mode!r}: expected one of {', '.join(SAVE_MODES)}")
        if self.run_dir is not None and not isinstance(self.run_dir, Path):
            object.__setattr__(self, "run_dir", Path(self.run_dir))
        object.__setattr__(self, "overrides", {k: v for k, v in self.overrides.items() if v is not None})

    @classmethod
    def of(cls, *, async_save: bool = False, sharded: bool = False, **fields: Any) -> "TrainRequest":
        """A request from keyword arguments: this class's fields, ``async_save``/``sharded`` for
        ``save_mode``, and any other name as an APTConfig override (checked by APTConfig)."""
        names = {f.name for f in dataclasses.fields(cls)}
        overrides = {**fields.pop("overrides", {}), **{k: fields.pop(k) for k in list(fields) if k not in names}}
        if async_save and sharded:
            raise TrainingError("--async-save works in one process without --sharded; drop one of them")
        mode = "async" if async_save else "sharded" if sharded else fields.pop("save_mode", "sync")
        return cls(**fields, save_mode=mode, overrides=overrides)


# -- starting a session ------------------------------------------------------------------------
def train(request: TrainRequest | None = None, /, **fields: Any) -> TrainResult:
    """Train a new run or continue one (in one process, or in each of ``torchrun``'s).

    Takes a ``TrainRequest``, or its fields as keywords (``TrainRequest.of``): for example
    ``train(run_dir="outputs/run1", model_size="tiny", epochs=2, quiet=True)``. ``async`` saves
    write checkpoints in a background thread (the training thread only copies the state);
    ``sharded`` saves model and optimizer with torch.distributed.checkpoint, which reshards when
    the number of processes changes. With ``backup_to`` the run is pushed to that store after
    each checkpoint, in the background, and once more at the end (also after Ctrl-C or SIGTERM).
    """
    req = request if request is not None else TrainRequest.of(**fields)
    dev = pick_device(req.device)
    d = Dist.from_env(dev)
    if d.enabled and dev.type == "cuda":
        dev = torch.device("cuda", d.local_rank)
    if req.save_mode == "async" and d.enabled:
        raise TrainingError("--async-save works in one process without --sharded; drop one of them")
    try:
        return _train(req, d, dev)
    finally:
        d.close()


def _train(req: TrainRequest, d: Dist, dev: torch.device) -> TrainResult:
    run_path, which = req.run_dir, None
    if req.resume_from:
        run_path, which = locate(req.resume_from, run_path)
    elif run_path is None:
        raise TrainingError("--run-dir: required, the folder of the new run (for example outputs/run1)")
    else:
        cfg0 = (req.config or preset(req.model_size)).replace(**req.overrides)
        d.on_main(lambda: new_run(run_path, cfg0, req.data) and None)
    run = req.checkpoint.run if req.checkpoint is not None else Run.open(run_path)
    try:
        return _session(req, d, dev, run, which)
    except BaseException:
        if which is None and d.is_main:
            run.reload()
            if run.latest is None:  # nothing was saved: a first run that failed leaves no folder behind
                shutil.rmtree(run.path, ignore_errors=True)
                log(req.quiet or not d.is_main, f"removed {run.path}: the run failed before its first checkpoint")
        raise


def _session(req: TrainRequest, d: Dist, dev: torch.device, run: Run, which: str | None) -> TrainResult:
    quiet, checkpoint, overrides, mode = req.quiet or not d.is_main, req.checkpoint, req.overrides, req.save_mode
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
        if which is not None and "epochs" not in overrides:  # the plan of the last session stands
            planned = next((h.get("planned_epochs") for h in reversed(run.manifest.history)
                            if isinstance(h, dict) and "planned_epochs" in h), None)
            if type(planned) is int and 1 <= planned <= 1_000_000:
                overrides = {**overrides, "epochs": planned}
        cfg, tok, text, changed = reopen_run(run, req.data, req.allow_data_change, overrides if which else {})
        if changed:
            log(quiet, "warning: training continues on different data (--allow-data-change)")
        if checkpoint is not None:
            check_weights_fit(cfg, checkpoint)
            warn_environment(run, dev, quiet)
            if checkpoint.has("dcp/.metadata"):
                mode = "sharded"  # a sharded run stays sharded
        torch.manual_seed(cfg.seed)
        session = build(run, cfg, tok, text, dev, d.rank, d.world)
        if d.enabled:  # same initial weights everywhere, then a dropout stream of each rank's own
            torch.manual_seed(cfg.seed * 1_000_003 + d.rank)
        backup = Backup(run.path, req.backup_to, warn=lambda m: log(quiet, m)) if req.backup_to and d.is_main else None
        ckpt = Checkpointer(run, model=session.model, optimizer=session.optimizer, scheduler=session.scheduler,
                            keep_last=cfg.keep_last, best_metric=cfg.best_metric, best_mode=cfg.best_mode,
                            mode=mode, on_commit=backup)
        state = _restore(session, ckpt, checkpoint, d, req.allow_data_change, quiet) if checkpoint else None
        if d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            session.model = DDP(session.model, device_ids=[dev.index] if dev.type == "cuda" else None)
        try:
            return Trainer(session, ckpt, d, state=state, quiet=quiet).fit(req.stop_at_step)
        finally:
            ckpt.wait()
            session.model = unwrap(session.model)  # drop the DDP wrapper before the group goes
            if backup is not None and run.latest is not None:
                # the final state, also after Ctrl-C or SIGTERM; a signal that comes while it is
                # pushed waits for the push (a second one still breaks out), then takes effect
                with StopRequest() as late:
                    last = backup.close()
                if late.signal is not None:
                    signal.raise_signal(late.signal)
                if last is not None:
                    log(quiet, f"backed up to {req.backup_to}: {last.sent_files} file(s) sent in this push,"
                               f" digest {last.digest[:16]}…; continue anywhere with"
                               f" `aptbundle resume --from {req.backup_to.rstrip('/')}/{run.name}`")


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
    _check_state(state, f"{checkpoint.name}/trainer_state.json")
    old_world = state.get("world_size", 1)
    if old_world != d.world:
        seen = int(state.get("position", 0)) * s.cfg.batch_size * old_world
        state["position"] = min(seen // (s.cfg.batch_size * d.world), s.sampler.num_batches() - 1)
        log(quiet, f"the run had {old_world} process(es), now {d.world}: continuing after {seen} samples"
                    f" of epoch {state.get('epoch')} (batch {state['position']})")
    elif state.get("steps_per_epoch") not in (None, s.sampler.num_batches()) and not allow_data_change:
        raise TrainingError(f"{s.run.name}: the data gives {s.sampler.num_batches()} steps per epoch,"
                            f" the run had {state['steps_per_epoch']}; pass --allow-data-change")
    if not 0 <= state.get("position", 0) < s.sampler.num_batches():  # past the end: the loop would never end
        raise TrainingError(f"{checkpoint.name}/trainer_state.json: position {state['position']} is outside the"
                            f" epoch's {s.sampler.num_batches()} batches; the checkpoint is damaged or crafted")
    log(quiet, f"resuming {s.run.name} from {checkpoint.name} (step {state.get('global_step')},"
                f" epoch {state.get('epoch')}) on {s.device.type}" + (f" x{d.world}" if d.enabled else ""))
    return state


def _check_state(state: dict, shown: str) -> None:
    """The numbers the loop runs on, range-checked: a checkpoint may come from anyone."""
    limits = {"global_step": 1 << 53, "epoch": 1 << 31, "position": 1 << 53, "world_size": 1 << 20}
    for key, top in limits.items():
        v = state.get(key, 1 if key == "world_size" else 0)
        if type(v) is not int or not (1 if key == "world_size" else 0) <= v < top:
            raise TrainingError(f"{shown}: {key} is {str(v)[:40]!r}; expected a whole number in range."
                                " The checkpoint is damaged or crafted")
    losses = state.get("loss_history", [])
    if not isinstance(losses, list) or len(losses) > state.get("global_step", 0) + 1 or not all(
            type(x) in (int, float) and x == x and abs(x) != float("inf") for x in losses):
        raise TrainingError(f"{shown}: loss_history is not a list of at most global_step finite numbers;"
                            " the checkpoint is damaged or crafted")


def resume_run(run_dir: str | Path, request: ResumeRequest) -> ResumeResult:
    """The ``aptbundle.trainers`` entry point (``aptbundle.ResumeTrainer``): continue ``run_dir``
    to its planned length."""
    res = train(TrainRequest(run_dir=Path(run_dir), resume_from=request.which, checkpoint=request.checkpoint,
                             stop_at_step=request.stop_at_step, device=request.device, data=request.data,
                             allow_data_change=request.allow_data_change, quiet=request.quiet,
                             backup_to=request.backup_to, overrides={"epochs": request.epochs}))
    return ResumeResult(res.run_dir, res.global_step, res.finished, res.last_checkpoint, res.stopped_by)


# -- the command line ---------------------------------------------------------------------------
_D = APTConfig()


@click.command(cls=Command, context_settings=CONTEXT)
@click.option("--run-dir", "--checkpoint-dir", "run_dir", type=click.Path(file_okay=False),
              help="The run folder (created if new).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="APTConfig JSON file (fields not given keep the preset's values).")
@click.option("--model-size", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True,
              help="Model preset: width, depth, context, batch size and learning rate.")
@click.option("--data", type=click.Path(dir_okay=False), help="UTF-8 text corpus [default: the built-in corpus].")
@click.option("--epochs", type=click.IntRange(1), help=f"Planned length in epochs [default: {_D.epochs}].")
@click.option("--batch-size", type=click.IntRange(1), help="Sequences per step [default: the preset's, 8 for tiny].")
@click.option("--lr", type=click.FloatRange(0, min_open=True), help="Peak learning rate [default: the preset's].")
@click.option("--seed", type=click.IntRange(0), help=f"Seeds weights, data order and dropout [default: {_D.seed}].")
@click.option("--save-every", type=click.IntRange(0), help="Also checkpoint every N steps [default: 0, epoch ends only].")
@click.option("--save-freq", type=click.IntRange(1), help=f"Checkpoint every N epochs [default: {_D.save_freq}].")
@click.option("--keep-last", type=click.IntRange(1), help=f"Checkpoints kept besides best and latest [default: {_D.keep_last}].")
@click.option("--eval-every", type=click.IntRange(0), help="Also log the validation loss every N steps [default: 0, epoch ends].")
@click.option("--best-metric", type=click.Choice(["loss", "val_loss"]), help="Metric that picks the best checkpoint [default: loss].")
@click.option("--best-mode", type=click.Choice(["min", "max"]), help="Best is the lowest (min) or highest (max) [default: min].")
@click.option("--stop-at-step", type=click.IntRange(1), help="Save and stop once global step N is done.")
@click.option("--resume-from", help="latest, best, a checkpoint name, or a run/checkpoint path.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to train (auto: a GPU if there is one).")
@click.option("--allow-data-change", is_flag=True, help="Continue even if the data differs from the run's.")
@click.option("--async-save", is_flag=True, help="Write checkpoints in a background thread.")
@click.option("--sharded", is_flag=True,
              help="Save model and optimizer with torch.distributed.checkpoint (reshards on resume).")
@click.option("--backup-to", metavar="STORE", help="Push the run to STORE (folder or URL) after each checkpoint,"
              " in the background, and at the end.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or messages.")
@click.pass_context
def main(ctx: click.Context, run_dir, config_file, model_size, data, resume_from, stop_at_step, device,
         allow_data_change, async_save, sharded, backup_to, quiet, **fields) -> None:
    """Train an APT model into a portable aptbundle run, or continue one."""
    config = preset(model_size).replace(**APTConfig.load(config_file).to_dict()) if config_file else None
    res = train(TrainRequest.of(config=config, run_dir=run_dir, model_size=model_size, data=data,
                                resume_from=resume_from, stop_at_step=stop_at_step, device=device,
                                allow_data_change=allow_data_change, quiet=quiet, async_save=async_save,
                                sharded=sharded, backup_to=backup_to, **fields))
    digest = Run.open(res.run_dir).manifest.digest()
    if res.finished:
        log(quiet, f"finished at step {res.global_step}: {res.run_dir} (digest {digest})\n"
                   f"next: aptbundle pack {res.run_dir}")
    else:
        log(quiet, f"stopped at step {res.global_step}: {res.run_dir} (digest {digest})\n"
                   f"next: aptbundle resume {res.run_dir}")
    if res.stopped_by:
        ctx.exit(status_for(res.stopped_by))


if __name__ == "__main__":
    main()

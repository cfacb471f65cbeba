"""The checkpointer: one object that saves and restores complete training state in a run.

In the spirit of torchtitan's checkpointer, a trainer hands over its stateful objects once
(model, optimizer, scheduler) and then only calls ``save`` and ``load``. Three modes:

- ``sync``: the state is written and committed before ``save`` returns;
- ``async``: the training thread copies the state (the only stall), a background thread writes
  and commits it, one save in flight;
- ``sharded``: model and optimizer go through torch.distributed.checkpoint, every process writes
  its shards (DCP reshards on load).

With several processes every rank writes its own RNG state (``rng_state-rankR.pt``) into one
staging folder, rank 0 writes the rest and commits, and all wait until the checkpoint is
complete. Staging happens inside the run (``checkpoints/.aptrun-tmp-…``), on the same file
system as the checkpoint, so the final rename is atomic and nothing is written anywhere else.

A commit, under the run's commit lock: rename the staged folder into ``checkpoints/NAME``, list
its files, update latest/best, retire old checkpoints (whatever folder they live in), save the
manifest, then delete what was retired. A crash at any moment leaves the manifest pointing at
complete checkpoints only. Loading takes a ``VerifiedCheckpoint`` (or verifies one at the
boundary); pickles are read with ``torch.load(weights_only=True)`` and nothing else.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import _remove_duplicate_names
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_file as _st_save_file

from aptbundle.format.manifest import BestInfo, CheckpointEntry
from aptbundle.format.metrics import METRICS_FILE, read_curves, summarize
from aptbundle.format.run import CHECKPOINTS, Run, environment_info, now_iso
from aptbundle.format.verify import VerifiedCheckpoint, verify_checkpoint
from aptbundle.ground import temporaries
from aptbundle.ground.errors import AptBundleError, CheckpointError
from aptbundle.ground.fsutil import fsync_dir, fsync_file
from aptbundle.ground.temporaries import remove_path
from aptbundle.state.collective import ProcessGroup
from aptbundle.state.rng import RNG_FILE, rng_file, rng_state, set_rng_state
from aptbundle.state.sharded import DCP_DIR, load_sharded, save_sharded

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "trainer_state.json"
MODES = ("sync", "async", "sharded")


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint at ``step``: ``step-00000500``."""
    return f"step-{step:08d}"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / compiled wrappers, so saved names carry no prefix."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _weights(model: torch.nn.Module, copy_: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What ``safetensors.torch.save_model`` writes: shared (tied) tensors once, under one name,
    with the others recorded in the metadata; copied to CPU memory when ``copy_``."""
    sd = model.state_dict()
    meta: dict[str, str] = {}
    for kept, removed in _remove_duplicate_names(sd).items():
        for name in removed:
            meta.setdefault(name, kept)
            del sd[name]
    out = {}
    for k, v in sd.items():
        v = v.detach()
        out[k] = v.to("cpu", copy=True).contiguous() if copy_ else v.contiguous()
    return out, meta


def _keep(path: Path) -> Path:
    """A second name for ``path``'s current content (a hard link, else a copy), to put it back."""
    saved = temporaries.temp_path(path.parent, f"was-{path.name}")
    try:
        os.link(path, saved)
    except OSError:
        shutil.copy2(path, saved)
    return saved


def verify_on_main(run: Run, which: str) -> VerifiedCheckpoint:
    """``verify_checkpoint`` done once by rank 0 for every training process (each gets the proof)."""
    group = ProcessGroup.current()
    if not group.several:
        return verify_checkpoint(run, which)
    name = group.on_main(lambda: verify_checkpoint(run, which).name)
    run.reload()
    entry = run.resolve_checkpoint(name)
    return VerifiedCheckpoint(run, entry, tuple(run.files_under(entry.folder)))


class Checkpointer:
    """Save and load full training state in a run.

    For example::

        ckpt = Checkpointer(Run.create("outputs/run1", trainer="t"), model=model, optimizer=opt,
                            scheduler=sched, keep_last=3)
        ckpt.save(step=100, epoch=0, trainer_state={"position": 100}, metrics={"loss": 2.1})
        state = ckpt.load("latest")     # verifies, then restores model, optimizer, scheduler, RNG
    """

    def __init__(self, run: Run | str | Path, *, model: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                 keep_last: int | None = None, best_metric: str = "loss", best_mode: str = "min",
                 mode: str = "sync", on_commit: Callable[[CheckpointEntry], Any] | None = None):
        self.run = run if isinstance(run, Run) else Run.open(run)
        self.on_commit = on_commit  # called after each commit, on the main process (a backup push)
        if keep_last is not None and keep_last < 1:
            raise CheckpointError(f"keep_last is {keep_last}; expected at least 1 (or None to keep all)")
        if best_mode not in ("min", "max"):
            raise CheckpointError(f"best_mode is {best_mode!r}; expected 'min' or 'max'")
        if mode not in MODES:
            raise CheckpointError(f"mode is {mode!r}; expected one of {', '.join(MODES)}")
        self.group = ProcessGroup.current()
        if mode == "async" and self.group.several:
            raise CheckpointError("asynchronous saving works in one process; use mode 'sync' or 'sharded'")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.keep_last, self.best_metric, self.best_mode, self.mode = keep_last, best_metric, best_mode, mode
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def collective(self) -> bool:
        """Every process takes part in a save (several processes, or DCP shards)."""
        return self.group.several or self.mode == "sharded"

    # -- sessions ----------------------------------------------------------------------------
    def start_session(self, *, device: str | None = None, start_step: int = 0, **info: Any) -> None:
        """Record in the run's history that a training session starts (saved with the next commit)."""
        self.run.start_session(start_step=start_step, stop_step=start_step, processes=self.group.world,
                               from_digest=self.run.manifest.digest(), **environment_info(device), **info)

    # -- saving ------------------------------------------------------------------------------
    def save(self, *, step: int, epoch: int | float, trainer_state: Mapping[str, Any] | None = None,
             metrics: Mapping[str, Any] | None = None, run_files: Mapping[str, bytes] | None = None,
             device: str | None = None, is_best: bool | None = None, reason: str | None = None) -> CheckpointEntry:
        """Write a complete checkpoint at ``step`` and commit it; return its manifest entry.

        ``run_files`` are other files of the run (``logs/metrics.jsonl``) rewritten in the same
        commit. ``is_best=True`` marks it best whatever its metrics. ``reason`` is recorded in
        the session's history entry. In ``async`` mode the entry is returned at once and the
        commit follows in the background (``wait`` re-raises its error).
        """
        self.wait()
        name = checkpoint_name(step)
        background = self.mode == "async"
        state = copy.deepcopy({"step": step, "epoch": epoch, **(trainer_state or {})})
        job = dict(name=name, step=step, epoch=epoch, state=state, metrics=dict(metrics or {}),
                   run_files=dict(run_files or {}), device=device, is_best=is_best, reason=reason)
        if self.collective:
            return self._save_collective(job)
        job.update(self._capture(copy_=background), rng=rng_state())
        if not background:
            return self._write(job)
        self._thread = threading.Thread(target=self._background, args=(job,), name=f"save-{name}")
        self._thread.start()
        return CheckpointEntry(name, step, epoch, dict(metrics or {}))

    def _capture(self, copy_: bool) -> dict:
        weights, meta = _weights(unwrap(self.model), copy_) if self.model is not None else (None, None)
        opt_sd = self.optimizer.state_dict() if self.optimizer is not None else None
        sched_sd = self.scheduler.state_dict() if self.scheduler is not None else None
        if copy_:  # deepcopy keeps shared objects shared, so the pickle is the same as in sync
            opt_sd, sched_sd = copy.deepcopy(opt_sd), copy.deepcopy(sched_sd)
        return dict(weights=weights, meta=meta, opt=opt_sd, sched=sched_sd)

    def _save_collective(self, job: dict) -> CheckpointEntry:
        g = self.group
        stage = Path(g.on_main(lambda: str(self._new_stage(job["name"]))))
        try:
            torch.save(rng_state(), stage / rng_file(g.rank))
            if self.mode == "sharded":
                save_sharded(stage / DCP_DIR, self.model, self.optimizer)
                job.update(weights=None, meta=None, opt=None,
                           sched=self.scheduler.state_dict() if self.scheduler is not None else None)
            elif g.is_main:
                job.update(self._capture(copy_=False))
        finally:
            g.barrier()
        job.update(rng=None, stage=stage)
        return g.on_main(lambda: self._write(job))

    def _background(self, job: dict) -> None:
        try:
            self._write(job)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Wait for a background save; re-raise its error in the caller's thread."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        err, self._error = self._error, None
        if err is not None:
            raise err

    close = wait

    def _new_stage(self, name: str) -> Path:
        parent = self.run.path / CHECKPOINTS
        parent.mkdir(parents=True, exist_ok=True)
        stage = temporaries.temp_path(parent, name)
        stage.mkdir()
        return stage

    def _write(self, job: dict) -> CheckpointEntry:
        stage = job.get("stage") or self._new_stage(job["name"])
        try:
            if job["weights"] is not None:
                _st_save_file(job["weights"], str(stage / MODEL_FILE), metadata=job["meta"])
            if job["opt"] is not None:
                torch.save(job["opt"], stage / OPTIMIZER_FILE)
            if job["sched"] is not None:
                torch.save(job["sched"], stage / SCHEDULER_FILE)
            if job["rng"] is not None:
                torch.save(job["rng"], stage / RNG_FILE)
            (stage / STATE_FILE).write_bytes(
                json.dumps(job["state"], sort_keys=True, indent=1, allow_nan=False).encode("utf-8"))
            for f in stage.rglob("*"):
                if f.is_file():
                    fsync_file(f)
            fsync_dir(stage)
        except Exception as e:  # disk full, quota, I/O error: safetensors and torch raise their own types
            remove_path(stage)
            raise CheckpointError(
                f"{self.run.name}/{CHECKPOINTS}/{job['name']}: could not be written ({e}); the last complete"
                " checkpoint is intact. Free disk space (or fix permissions) and resume") from None
        except BaseException:
            remove_path(stage)
            raise
        return self._commit(job, stage)

    def _commit(self, job: dict, stage: Path) -> CheckpointEntry:
        """Rename the checkpoint in, rewrite the run files, save the manifest; on any failure put
        everything back as it was, so the run still verifies."""
        run, name = self.run, job["name"]
        final = run.path / CHECKPOINTS / name
        with run.committing():
            before = copy.deepcopy(run.manifest)
            moved: list[tuple[Path, Path]] = []  # (from, to) renames to undo on failure
            backups: dict[Path, Path] = {}  # run file -> its previous content
            try:
                if final.exists():  # an earlier save at this step (listed or orphaned) is replaced
                    old = temporaries.temp_path(final.parent, f"old-{name}")
                    os.replace(final, old)
                    moved.append((final, old))
                os.replace(stage, final)
                moved.append((stage, final))
                fsync_dir(final.parent)
                for rel, data in job["run_files"].items():
                    target = run.path / rel
                    if target.is_file():
                        backups[target] = _keep(target)
                    run.write_file(rel, data)
                entry, retired = self._record(job, final)
                run.save_manifest()
            except BaseException:
                run.manifest = before
                for target, saved in backups.items():
                    os.replace(saved, target)
                for src, dst in reversed(moved):
                    if src == stage:
                        remove_path(dst)
                    else:
                        os.replace(dst, src)
                raise
            for saved in backups.values():
                saved.unlink(missing_ok=True)
            for d in retired + [old for src, old in moved if src == final]:
                remove_path(d)
        if self.on_commit is not None:
            self.on_commit(entry)
        return entry

    def _record(self, job: dict, final: Path) -> tuple[CheckpointEntry, list[Path]]:
        """List the new checkpoint and its files in the in-memory manifest; retire old ones and
        return their folders, to delete once the manifest is saved."""
        run, man, name = self.run, self.run.manifest, job["name"]
        if METRICS_FILE in job["run_files"]:  # the whole curve, small, for `inspect` of an archive
            man.extra["curves"] = summarize(read_curves(job["run_files"][METRICS_FILE]))
        old_entry = man.checkpoint(name)
        run.forget_prefix(old_entry.folder if old_entry else f"{CHECKPOINTS}/{name}")
        for f in sorted(final.rglob("*")):
            if f.is_file():
                run.record_file(f"{CHECKPOINTS}/{name}/{f.relative_to(final).as_posix()}")
        entry = CheckpointEntry(name, job["step"], job["epoch"], job["metrics"])
        man.checkpoints = sorted([c for c in man.checkpoints if c.name != name] + [entry], key=lambda c: c.step)
        man.latest = max(man.checkpoints, key=lambda c: c.step).name
        self._update_best(name, job["metrics"], job["is_best"])
        retired = run.retire(run.to_retire(self.keep_last))
        man.environment = environment_info(job["device"])
        if man.history:
            man.history[-1].update(stop_step=job["step"], stopped_at=now_iso(),
                                   **({"reason": job["reason"]} if job["reason"] else {}))
        return entry, retired

    def _update_best(self, name: str, metrics: dict, is_best: bool | None) -> None:
        man = self.run.manifest
        value = metrics.get(self.best_metric)
        if is_best:
            v = float(value) if isinstance(value, (int, float)) else float("nan")
            man.best = BestInfo(name, self.best_metric, self.best_mode, v if v == v else 0.0)
        elif isinstance(value, (int, float)) and value == value:
            cur = man.best
            better = (cur is None or cur.name == name or man.checkpoint(cur.name) is None
                      or (value < cur.value if self.best_mode == "min" else value > cur.value))
            if better:
                man.best = BestInfo(name, self.best_metric, self.best_mode, float(value))

    # -- loading -----------------------------------------------------------------------------
    def verify(self, which: str = "latest") -> VerifiedCheckpoint:
        """Resolve and verify ``which`` once: the boundary of a load."""
        return verify_on_main(self.run, which)

    def load(self, checkpoint: VerifiedCheckpoint | str = "latest", *,
             map_location: str | torch.device = "cpu", restore_rng: bool = True) -> dict[str, Any]:
        """Restore the handed-over objects from ``checkpoint``; return the trainer state.

        A name (``latest``, ``best``, ``step-…``) is verified first; a ``VerifiedCheckpoint``
        is loaded as it is. This process's RNG state (``rng_state-rankR.pt``, else, for rank 0,
        ``rng_state.pt``) is restored; a rank the checkpoint has no state for keeps its own.
        """
        ckpt = checkpoint if isinstance(checkpoint, VerifiedCheckpoint) else self.verify(checkpoint)
        try:
            return self._load(ckpt, map_location, restore_rng)
        except (AptBundleError, OSError):
            raise
        except Exception as e:  # state that loads safely but does not fit: a damaged or crafted checkpoint
            raise CheckpointError(f"{ckpt.name}: its state does not fit this model and optimizer"
                                  f" ({type(e).__name__}: {str(e)[:200]}); was it written by another"
                                  " config, or altered?") from None

    def _load(self, ckpt: VerifiedCheckpoint, map_location, restore_rng: bool) -> dict[str, Any]:
        d = ckpt.folder
        if ckpt.has(f"{DCP_DIR}/.metadata"):
            if self.model is not None:
                load_sharded(d / DCP_DIR, unwrap(self.model), self.optimizer)
        else:
            if self.model is not None:
                self._load_weights(ckpt)
            if self.optimizer is not None:
                self.optimizer.load_state_dict(self._load_pickle(ckpt, OPTIMIZER_FILE, map_location))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(self._load_pickle(ckpt, SCHEDULER_FILE, map_location))
        if restore_rng:
            for name in (rng_file(self.group.rank), RNG_FILE if self.group.is_main else None):
                if name and ckpt.has(name):
                    set_rng_state(self._load_pickle(ckpt, name, "cpu"))
                    break
        try:
            state = json.loads((d / STATE_FILE).read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{ckpt.name}/{STATE_FILE}: unreadable ({e}); expected JSON trainer state") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{ckpt.name}/{STATE_FILE}: expected a JSON object, found {type(state).__name__}")
        return state

    def _load_weights(self, ckpt: VerifiedCheckpoint) -> None:
        if not ckpt.has(MODEL_FILE):
            raise CheckpointError(f"{ckpt.name}/{MODEL_FILE}: missing; this checkpoint holds no weights")
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        missing, unexpected = _st_load_model(unwrap(self.model), str(ckpt.folder / MODEL_FILE), strict=False,
                                             device=str(device))
        if missing or unexpected:
            raise CheckpointError(
                f"{ckpt.name}/{MODEL_FILE}: weights do not fit the model (missing {sorted(missing)[:5]},"
                f" unexpected {sorted(unexpected)[:5]}); was the run trained with another config?")

    @staticmethod
    def _load_pickle(ckpt: VerifiedCheckpoint, name: str, map_location) -> Any:
        if not ckpt.has(name):
            raise CheckpointError(f"{ckpt.name}/{name}: missing; this checkpoint cannot restore that state")
        try:
            return torch.load(ckpt.folder / name, map_location=map_location, weights_only=True)
        except Exception as e:  # weights_only refuses anything but tensors and plain data
            raise CheckpointError(f"{ckpt.name}/{name}: could not be loaded safely ({e})") from None

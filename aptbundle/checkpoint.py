"""CheckpointManager: save and restore the complete training state inside a run.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` holding the weights
(``model.safetensors``, shared/tied tensors stored once), ``optimizer.pt``, ``scheduler.pt``,
``rng_state.pt`` (plain values only) and ``trainer_state.json``. It is built under a temporary
name, fsynced, renamed into place, and only then listed in the manifest; retired checkpoints
are deleted after that. A crash at any moment leaves the manifest pointing at complete
checkpoints only. Pickled files are read with ``torch.load(weights_only=True)`` and nothing else.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import random
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import _remove_duplicate_names
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_file as _st_save_file

from aptbundle.errors import CheckpointError, VerifyError
from aptbundle.fsutil import TMP_PREFIX, fsync_dir, fsync_file
from aptbundle.manifest import BestInfo, CheckpointEntry
from aptbundle.run import CHECKPOINTS, Run, environment_info
from aptbundle.scan import scan_file

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"
STATE_FILE = "trainer_state.json"


def rng_file(rank: int | None = None) -> str:
    """``rng_state.pt``, or ``rng_state-rankR.pt`` for one of several training processes."""
    return RNG_FILE if rank is None else f"rng_state-rank{rank}.pt"


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint at ``step``: ``step-00000500``."""
    return f"step-{step:08d}"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / compiled wrappers, so saved names carry no prefix."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def rng_state() -> dict[str, Any]:
    """Every RNG that training may touch, as plain values ``weights_only`` can load."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    state["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``rng_state`` captured; CUDA state is skipped with a warning without a GPU."""
    if "python" in state:
        v = state["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda:
        if torch.cuda.is_available():
            n = min(len(cuda), torch.cuda.device_count())
            torch.cuda.set_rng_state_all([t.cpu() for t in cuda[:n]])
        else:
            warnings.warn("checkpoint holds CUDA RNG state but no GPU is available here; skipped it", stacklevel=2)
    np_state = state.get("numpy")
    np = sys.modules.get("numpy")
    if np_state is not None and np is not None:
        kind, keys, pos, has_gauss, gauss = np_state
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _weights(model: torch.nn.Module, copy: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What ``safetensors.torch.save_model`` writes: shared (tied) tensors once, under one name,
    with the others recorded in the metadata; copied to CPU memory when ``copy``."""
    sd = model.state_dict()
    meta: dict[str, str] = {}
    for kept, removed in _remove_duplicate_names(sd).items():
        for name in removed:
            meta.setdefault(name, kept)
            del sd[name]
    out = {}
    for k, v in sd.items():
        v = v.detach()
        out[k] = v.to("cpu", copy=True).contiguous() if copy else v.contiguous()
    return out, meta


class CheckpointManager:
    """Save and load full training state in a run.

    >>> # cm = CheckpointManager(Run.create("outputs/run1", trainer="apt_model"), keep_last=3)
    >>> # cm.save(step=100, epoch=0, model=model, optimizer=opt, scheduler=sched,
    >>> #         trainer_state={"position": 100}, metrics={"loss": 2.1})
    >>> # state = cm.load("latest", model=model, optimizer=opt, scheduler=sched)
    """

    def __init__(self, run: Run | str | Path, *, keep_last: int | None = None,
                 best_metric: str = "loss", best_mode: str = "min", temp_dir: str | Path | None = None):
        self.run = run if isinstance(run, Run) else Run.open(run)
        if keep_last is not None and keep_last < 1:
            raise CheckpointError(f"keep_last is {keep_last}; expected at least 1 (or None to keep all)")
        if best_mode not in ("min", "max"):
            raise CheckpointError(f"best_mode is {best_mode!r}; expected 'min' or 'max'")
        self.keep_last = keep_last
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.temp_dir = Path(temp_dir) if temp_dir else None

    # -- saving ------------------------------------------------------------------------------
    def _staging_dir(self, name: str) -> Path:
        ck = self.run.path / CHECKPOINTS
        ck.mkdir(parents=True, exist_ok=True)
        parent = ck
        if self.temp_dir is not None:
            self.temp_dir.mkdir(parents=True, exist_ok=True)
            if os.stat(self.temp_dir).st_dev == os.stat(ck).st_dev:
                parent = self.temp_dir  # same file system: the final rename is still atomic
        d = parent / f"{TMP_PREFIX}{name}-{os.getpid()}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        return d

    def save(self, *, step: int, epoch: int | float, model: torch.nn.Module | None,
             optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
             trainer_state: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None,
             rng: bool = True, run_files: Mapping[str, bytes] | None = None,
             device: str | None = None, is_best: bool | None = None,
             background: bool = False, stage_dir: Path | None = None) -> CheckpointEntry:
        """Write a complete checkpoint at ``step`` and commit it to the manifest.

        ``run_files`` are other files of the run (for example ``logs/metrics.jsonl``) rewritten
        atomically in the same commit. ``is_best=True`` marks it best whatever its metrics.

        ``background=True`` copies the state off the caller's thread (a memory copy: the stall)
        and writes and commits it in a background thread; at most one save is in flight (the
        next save, ``wait()`` or ``close()`` waits for it and raises its error, if any).
        ``stage_dir`` is a staging folder other processes already wrote files into (per-rank RNG
        state, DCP shards): they become part of the checkpoint. ``model=None`` writes no
        ``model.safetensors`` (the weights are in those shards).
        Returns the new manifest entry.
        """
        self.wait()
        name = checkpoint_name(step)
        weights, meta = _weights(unwrap(model), copy=background) if model is not None else (None, None)
        opt_sd = optimizer.state_dict() if optimizer is not None else None
        sched_sd = scheduler.state_dict() if scheduler is not None else None
        if background:  # deepcopy keeps shared objects shared, so the pickle is the same as in sync
            opt_sd, sched_sd = copy.deepcopy(opt_sd), copy.deepcopy(sched_sd)
        state = copy.deepcopy({"step": step, "epoch": epoch, **(trainer_state or {})})
        args = (name, step, epoch, weights, meta, opt_sd, sched_sd, rng_state() if rng else None, state,
                dict(metrics or {}), dict(run_files or {}), device, is_best, stage_dir)
        if not background:
            return self._write(*args)
        self._thread = threading.Thread(target=self._background, args=args, name=f"save-{name}")
        self._thread.start()
        return CheckpointEntry(name, step, epoch, dict(metrics or {}))

    def _background(self, *args) -> None:
        try:
            self._write(*args)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Wait for a background save; re-raise its error in the caller's thread."""
        t = getattr(self, "_thread", None)
        if t is not None:
            t.join()
            self._thread = None
        err = getattr(self, "_error", None)
        if err is not None:
            self._error = None
            raise err

    close = wait

    def _write(self, name, step, epoch, weights, meta, opt_sd, sched_sd, rng, state, metrics, run_files,
               device, is_best, stage_dir=None) -> CheckpointEntry:
        stage = stage_dir or self._staging_dir(name)
        try:
            if weights is not None:
                _st_save_file(weights, str(stage / MODEL_FILE), metadata=meta)
            if opt_sd is not None:
                torch.save(opt_sd, stage / OPTIMIZER_FILE)
            if sched_sd is not None:
                torch.save(sched_sd, stage / SCHEDULER_FILE)
            if rng is not None:
                torch.save(rng, stage / RNG_FILE)
            (stage / STATE_FILE).write_bytes(
                json.dumps(state, sort_keys=True, indent=1, allow_nan=False).encode("utf-8"))
            for f in stage.rglob("*"):
                if f.is_file():
                    fsync_file(f)
            fsync_dir(stage)
        except Exception as e:  # disk full, quota, I/O error: safetensors and torch raise their own types
            shutil.rmtree(stage, ignore_errors=True)
            raise CheckpointError(
                f"{self.run.name}/checkpoints/{name}: could not be written ({e}); the last complete"
                " checkpoint is intact. Free disk space (or fix permissions) and resume") from None
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return self._commit(name, stage, step, epoch, metrics, run_files, device, is_best)

    def _commit(self, name: str, stage: Path, step: int, epoch, metrics: dict,
                run_files: Mapping[str, bytes], device: str | None, is_best: bool | None) -> CheckpointEntry:
        run, man = self.run, self.run.manifest
        final = run.checkpoint_dir(name)
        retired: list[Path] = []
        if final.exists():  # an earlier save at this step (listed or orphaned) is replaced
            old = final.parent / f"{TMP_PREFIX}old-{name}-{os.getpid()}"
            os.replace(final, old)
            retired.append(old)
        os.replace(stage, final)
        fsync_dir(final.parent)
        for rel, data in run_files.items():
            run.write_file(rel, data)
        run.forget_prefix(f"{CHECKPOINTS}/{name}")
        for f in sorted(final.rglob("*")):
            if f.is_file():
                run.record_file(f"{CHECKPOINTS}/{name}/{f.relative_to(final).as_posix()}")
        entry = CheckpointEntry(name, step, epoch, metrics)
        man.checkpoints = sorted([c for c in man.checkpoints if c.name != name] + [entry], key=lambda c: c.step)
        man.latest = max(man.checkpoints, key=lambda c: c.step).name
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
        for c in self._to_retire():
            run.forget_prefix(f"{CHECKPOINTS}/{c.name}")
            man.checkpoints.remove(c)
            retired.append(run.checkpoint_dir(c.name))
        man.environment = environment_info(device)
        run.save_manifest()
        for d in retired:
            shutil.rmtree(d, ignore_errors=True)
        return entry

    def _to_retire(self) -> list[CheckpointEntry]:
        man = self.run.manifest
        if self.keep_last is None:
            return []
        keep = {c.name for c in man.checkpoints[-self.keep_last:]}
        keep.add(man.latest)
        if man.best:
            keep.add(man.best.name)
        return [c for c in man.checkpoints if c.name not in keep]

    # -- loading -----------------------------------------------------------------------------
    def verify_checkpoint(self, entry: CheckpointEntry) -> None:
        """Rehash the checkpoint's files and scan its pickles; raise on any problem."""
        files = [f.path for f in self.run.files_under(entry.folder)]
        if not files:
            raise CheckpointError(f"{self.run.name}: checkpoint {entry.name} lists no files in the manifest")
        problems = self.run.verify(only=files)
        if problems:
            raise VerifyError(problems, what=f"checkpoint {entry.name}")
        for rel in files:
            scan_file(self.run.path / rel, rel)

    def load(self, which: str = "latest", *, model: torch.nn.Module | None = None,
             optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
             map_location: str | torch.device = "cpu", restore_rng: bool = True,
             verify: bool = True, rank: int = 0) -> dict[str, Any]:
        """Restore state from checkpoint ``which`` (latest, best or a name); return the trainer state.

        The RNG state restored is process ``rank``'s (``rng_state-rankR.pt``), else, for rank 0,
        ``rng_state.pt``; a rank the checkpoint has no state for keeps its current RNG.
        """
        entry = self.run.resolve_checkpoint(which)
        if verify:
            self.verify_checkpoint(entry)
        d = self.run.checkpoint_dir(entry.name)
        if model is not None:
            missing, unexpected = _st_load_model(unwrap(model), str(d / MODEL_FILE), strict=False,
                                                 device=str(map_location))
            if missing or unexpected:
                raise CheckpointError(
                    f"{entry.name}/{MODEL_FILE}: weights do not fit the model (missing {sorted(missing)[:5]},"
                    f" unexpected {sorted(unexpected)[:5]}); was the run trained with another config?")
        if optimizer is not None:
            optimizer.load_state_dict(self._load_pickle(d / OPTIMIZER_FILE, entry, map_location))
        if scheduler is not None:
            scheduler.load_state_dict(self._load_pickle(d / SCHEDULER_FILE, entry, map_location))
        if restore_rng:
            for name in (rng_file(rank), RNG_FILE if rank == 0 else None):
                if name and (d / name).exists():
                    set_rng_state(self._load_pickle(d / name, entry, "cpu"))
                    break
        try:
            return json.loads((d / STATE_FILE).read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{entry.name}/{STATE_FILE}: unreadable ({e}); expected JSON trainer state") from None

    def _load_pickle(self, path: Path, entry: CheckpointEntry, map_location) -> Any:
        if not path.exists():
            raise CheckpointError(f"{entry.name}/{path.name}: missing; this checkpoint cannot restore that state")
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # weights_only refuses anything but tensors and plain data
            raise CheckpointError(f"{entry.name}/{path.name}: could not be loaded safely ({e})") from None

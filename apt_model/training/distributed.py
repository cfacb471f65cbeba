"""Several processes (``torchrun``) and sharded checkpoints, with torch's own engines.

``Dist`` wraps the process group that ``torchrun`` describes in its environment (gloo on CPU,
nccl on GPU). Sharded checkpoints are written and read with ``torch.distributed.checkpoint``
(DCP), which reshards on load, so a run saved by N processes resumes on M. DCP's ``.metadata``
is a pickle: it passes aptbundle's static scan before DCP reads it, and it is written without
the absolute checkpoint path DCP would otherwise record.
"""

from __future__ import annotations

import gc
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from aptbundle.errors import AptBundleError, ResumeError
from aptbundle.scan import scan_file

DCP_DIR = "dcp"


@dataclass
class Dist:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, device: torch.device) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_available():
            raise ResumeError("WORLD_SIZE > 1 but this torch has no torch.distributed; run one process")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        d = cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(d.local_rank)
        return d

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over all ranks (the value itself in one process)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on one (a signal seen by one rank stops all)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0])
        dist.all_reduce(t)
        return bool(t.item())

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0; every rank gets its result, or raises its error."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except AptBundleError as e:
                error = str(e)
        if self.enabled:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0)
            result, error = box[0]
        if error is not None:
            raise ResumeError(error)
        return result

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            # DDP's reducer holds the group and sits in reference cycles: free it first, or the
            # interpreter may destroy it after the group and abort ("terminate called ...")
            gc.collect()
            try:
                dist.barrier()  # no rank tears the group down while another still talks to it
            finally:
                dist.destroy_process_group()


class _Writer:
    """A DCP file-system writer that records no absolute path in ``.metadata``."""

    @staticmethod
    def make(path: Path):
        from torch.distributed.checkpoint import FileSystemWriter

        class Writer(FileSystemWriter):
            def storage_meta(self):  # the default stores the absolute checkpoint path
                return None

        return Writer(str(path))


def _quiet():
    w = warnings.catch_warnings()
    w.__enter__()
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    return w


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Collective: every rank writes its shards of model and optimizer state into ``folder``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    w = _quiet()
    try:
        msd, osd = get_state_dict(model, optimizer if optimizer is not None else [])
        state = {"model": msd} if optimizer is None else {"model": msd, "optim": osd}
        dcp.save(state, storage_writer=_Writer.make(folder))
    finally:
        w.__exit__(None, None, None)


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 shown: str) -> None:
    """Collective: restore model (and optimizer) state from a DCP folder, resharding as needed.

    The ``.metadata`` pickle is scanned statically first; DCP unpickles it only if it passed.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    scan_file(folder / ".metadata", f"{shown}/.metadata")
    w = _quiet()
    try:
        msd, osd = get_state_dict(model, optimizer if optimizer is not None else [])
        state = {"model": msd} if optimizer is None else {"model": msd, "optim": osd}
        dcp.load(state, storage_reader=FileSystemReader(str(folder)))
        if optimizer is None:
            set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    finally:
        w.__exit__(None, None, None)


def is_sharded(ckpt: Path) -> bool:
    return (ckpt / DCP_DIR / ".metadata").is_file()

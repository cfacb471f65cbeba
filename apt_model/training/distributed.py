"""Several training processes (``torchrun``): the process group and the few collectives the
loop needs (a mean loss, a stop seen by any rank). Checkpoints, sharded or not, are aptbundle's
``Checkpointer``'s business.

``Dist`` wraps the process group that ``torchrun`` describes in its environment (gloo on CPU,
nccl on GPU).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from aptbundle import ProcessGroup
from apt_model.errors import TrainingError


@dataclass(frozen=True)
class Dist(ProcessGroup):
    """This process's place among the training processes (rank 0 of 1 without torchrun), with
    aptbundle's ``barrier`` and ``on_main`` and the loop's own collectives."""

    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.several

    @classmethod
    def from_env(cls, device: torch.device) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_available():
            raise TrainingError("WORLD_SIZE > 1 but this torch has no torch.distributed; run one process")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        d = cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(d.local_rank)
        return d

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

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            # DDP's reducer holds the group and sits in reference cycles: free it first, or the
            # interpreter may destroy it after the group and abort ("terminate called ...")
            gc.collect()
            try:
                dist.barrier()  # no rank tears the group down while another still talks to it
            finally:
                dist.destroy_process_group()

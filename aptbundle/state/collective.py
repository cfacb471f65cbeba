"""The few collective steps a checkpoint needs when several processes train (``torchrun``).

``ProcessGroup`` reads its place from ``torch.distributed`` when a process group is initialised and is
a group of one otherwise, so the checkpointer runs the same code in both cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.distributed as dist

from aptbundle.ground import errors
from aptbundle.ground.errors import AptBundleError, CheckpointError


@dataclass(frozen=True)
class ProcessGroup:
    """This process's rank among ``world`` training processes."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "ProcessGroup":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.several:
            dist.barrier()

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0; every rank gets its result, or raises its error."""
        result, error, original = None, None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # every rank must hear of it, or the others wait forever
                kind = type(e).__name__ if isinstance(e, AptBundleError) else "CheckpointError"
                error, original = (kind, str(e)), e
        if self.several:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0)
            result, error = box[0]
        if original is not None:
            raise original
        if error is not None:
            raise _rebuild(*error)
        return result


def _rebuild(kind: str, message: str) -> AptBundleError:
    """The error rank 0 raised, as the same type on this rank."""
    cls = getattr(errors, kind, CheckpointError)
    if not (isinstance(cls, type) and issubclass(cls, AptBundleError)):
        cls = CheckpointError
    e = cls.__new__(cls)
    AptBundleError.__init__(e, message)
    if isinstance(e, errors.VerifyError):
        e.problems = []
    return e

"""Sharded checkpoints with torch.distributed.checkpoint (DCP), which reshards on load.

A run saved by N processes resumes on M. DCP's ``.metadata`` is a pickle: it is written without
the absolute path DCP would otherwise record, and it has passed aptbundle's static scan (the
checkpoint was verified) before DCP reads it. Non-tensor values that DCP stores as pickled
bytes are loaded with ``torch.load(weights_only=True)``, not DCP's default full unpickling.
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

DCP_DIR = "dcp"


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def _writer(path: Path):
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        def storage_meta(self):  # the default stores the absolute checkpoint path
            return None

    return Writer(str(path))


def _planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._nested_dict import set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's default planner, but byte items are loaded as weights, never unpickled freely."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafeLoadPlanner()


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer if optimizer is not None else [])
    return {"model": msd} if optimizer is None else {"model": msd, "optim": osd}


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Collective: every rank writes its shards of model and optimizer state into ``folder``."""
    import torch.distributed.checkpoint as dcp

    with _quiet():
        dcp.save(_state(model, optimizer), storage_writer=_writer(folder))


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Collective: restore model (and optimizer) state from a verified DCP folder, resharding."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    with _quiet():
        state = _state(model, optimizer)
        dcp.load(state, storage_reader=FileSystemReader(str(folder)), planner=_planner())
        set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                       optim_state_dict=state.get("optim", {}))

"""Every random number generator training touches, captured as plain values and restored.

``rng_state`` holds only what ``torch.load(weights_only=True)`` can read back (tensors, lists,
numbers), so an RNG file is as safe to load as the weights.
"""

from __future__ import annotations

import random
import sys
import warnings
from typing import Any, Mapping

import torch

RNG_FILE = "rng_state.pt"


def rng_file(rank: int | None = None) -> str:
    """``rng_state.pt``, or ``rng_state-rankR.pt`` for one of several training processes."""
    return RNG_FILE if rank is None else f"rng_state-rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    """Python, torch CPU, CUDA and (if imported) numpy generator states."""
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

"""The training corpus, cut into blocks, and a sampler whose position can be restored exactly.

The order of an epoch is a pure function of (seed, epoch): a ``torch.randperm`` from a private
generator, so nothing else that draws random numbers can shift it. The position is simply how
many batches of that epoch are done; restoring it costs nothing and replays no data. With
several processes each rank takes every ``world``-th index of the same order.

The corpus travels with the run (``data/NAME`` when it is at most 64 MiB) and is described by
``data/source.json`` (name, size, SHA-256) either way, so a resume can tell if the data changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from aptbundle import UnsafePathError, check_name
from apt_model.errors import DataError

COPY_LIMIT = 64 * 1024 * 1024
SOURCE_FILE = "data/source.json"


def builtin_corpus() -> Path:
    """The sample corpus shipped with the package (mixed English and Chinese)."""
    return Path(__file__).resolve().parent / "corpus" / "sample.txt"


def read_text(path: str | Path) -> str:
    """A UTF-8 corpus file, with a clear error if it is missing or not text."""
    p = Path(path)
    try:
        return p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file; pass an existing UTF-8 text file with --data") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); --data expects a UTF-8 text file") from None


def describe_source(path: str | Path) -> dict:
    """Name, size and SHA-256 of a data file: what a run records about its corpus."""
    data = Path(path).read_bytes()
    return {"name": Path(path).name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "copied": len(data) <= COPY_LIMIT}


def source_record(run_path: Path) -> dict:
    """``data/source.json``, checked: it comes with the run, and a run may come from anyone."""
    shown = f"{run_path.name}/{SOURCE_FILE}"
    try:
        rec = json.loads((run_path / SOURCE_FILE).read_text("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise DataError(f"{shown}: unreadable ({e}); the run does not say what data it used") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
        raise DataError(f"{shown}: expected an object with the corpus' name, size and sha256")
    try:  # one plain file name: never a path that reaches outside the run's data folder
        rec["name"] = check_name(rec["name"], what="corpus name")
    except UnsafePathError as e:
        raise DataError(f"{shown}: {e}") from None
    return rec


def resolve_data(run_path: Path, data: str | Path | None, allow_change: bool) -> tuple[Path, bool]:
    """Which corpus a resumed run trains on, and whether it differs from the recorded one.

    The copy inside the run is used unless ``data`` is given; a ``data`` file whose hash differs
    from the record is refused unless ``allow_change``.
    """
    rec = source_record(run_path)
    if data is None:
        if not rec.get("copied"):
            raise DataError(
                f"{run_path.name}: its corpus {rec.get('name')!r} ({rec.get('size')} bytes) was too large to travel"
                " with the run; pass the same file with --data")
        inside = run_path / "data" / rec["name"]
        if inside.is_symlink() or not inside.is_file():  # a FIFO, a device or a link would be read as text
            raise DataError(f"{run_path.name}/data/{rec['name']}: expected the run's own copy of its corpus, a"
                            " regular file; found something else. The run is damaged or crafted")
        return inside, False
    found = describe_source(data)
    if found["sha256"] != rec.get("sha256"):
        if not allow_change:
            raise DataError(
                f"{data}: differs from the corpus this run was trained on ({rec.get('name')!r}, sha256"
                f" {str(rec.get('sha256'))[:12]}…, found {found['sha256'][:12]}…); resuming on other data is"
                " not an exact resume. Pass --allow-data-change to do it anyway")
        return Path(data), True
    return Path(data), False


def make_blocks(ids: list[int], block_size: int) -> torch.Tensor:
    """Non-overlapping windows of ``block_size + 1`` tokens (inputs plus next-token targets)."""
    n = (len(ids) - 1) // block_size
    if n < 2:
        raise DataError(f"corpus of {len(ids)} tokens is too short for block_size {block_size}; use more text")
    t = torch.tensor(ids[: n * block_size + 1], dtype=torch.long)
    return torch.stack([t[i * block_size: i * block_size + block_size + 1] for i in range(n)])


def split_blocks(blocks: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The last blocks are held out for validation (at least one when ``val_fraction`` > 0)."""
    n_val = int(len(blocks) * val_fraction)
    if val_fraction > 0:
        n_val = max(1, n_val)
    n_val = min(n_val, len(blocks) - 1)
    return blocks[: len(blocks) - n_val], blocks[len(blocks) - n_val:]


@dataclass
class ResumableSampler:
    """Batches of indices for (seed, epoch), restartable at any batch.

    >>> s = ResumableSampler(10, 4, seed=1); [b.tolist() for b in s.batches(0)] == [b.tolist() for b in s.batches(0)]
    True
    """

    n: int
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        per_rank = self.n // self.world
        return perm[self.rank: per_rank * self.world: self.world]

    def num_batches(self) -> int:
        per_rank = self.n // self.world
        return max(1, -(-per_rank // self.batch_size))

    def batches(self, epoch: int, start: int = 0):
        """Index tensors of the epoch's batches from batch number ``start`` on."""
        order = self.order(epoch)
        for b in range(start, self.num_batches()):
            yield order[b * self.batch_size: (b + 1) * self.batch_size]

"""APTConfig: every setting that rebuilds the model, the data and the trainer, as one dataclass.

It round-trips through JSON (``config.json`` in the run) and has presets ``tiny`` (an epoch of the
built-in corpus in seconds on 2 CPU cores), ``small`` and ``base``. ``__post_init__`` refuses a
bad value by naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from apt_model.errors import ConfigError


@dataclass
class APTConfig:
    """Model and training settings of an APT run."""

    # -- model
    vocab_size: int = 0  # set from the tokenizer when the run is created
    d_model: int = 64  # width of the residual stream
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4  # attention heads per block (d_model must divide by it)
    d_ff: int = 256  # hidden width of each block's feed-forward layer
    block_size: int = 64  # tokens per training sequence (the context length)
    dropout: float = 0.1  # dropout on attention weights and residual branches
    use_autopoietic: bool = True  # False gives plain multi-head attention
    # -- training
    epochs: int = 2  # planned length of the run, in passes over the training blocks
    batch_size: int = 8  # sequences per optimisation step
    lr: float = 3e-3  # peak learning rate of AdamW
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    warmup_steps: int = 10  # linear warm-up before the cosine decay
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm (0 disables clipping)
    seed: int = 1234  # seeds the weights, the data order and dropout
    val_fraction: float = 0.05  # share of blocks held out for validation loss
    save_every: int = 0  # also checkpoint every N steps (0: only at epoch ends)
    save_freq: int = 1  # checkpoint every N epochs
    keep_last: int = 3  # checkpoints kept besides the best and the latest
    log_every: int = 1  # write a metrics line every N steps
    eval_every: int = 0  # also log the validation loss every N steps (0: at epoch ends only)
    best_metric: str = "loss"  # the metric that picks the best checkpoint (loss or val_loss)
    best_mode: str = "min"  # whether the best checkpoint has the lowest (min) or highest (max) value

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            want = {"int": int, "float": (int, float), "bool": bool, "str": str}[str(f.type)]
            if isinstance(v, bool) and str(f.type) != "bool" or not isinstance(v, want):
                raise ConfigError(f"config field {f.name}: expected {f.type}, found {v!r}")
        positive = ("d_model", "n_layers", "n_heads", "d_ff", "block_size", "epochs", "batch_size",
                    "save_freq", "keep_last", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name}: must be at least 1, found {getattr(self, name)}")
        for name in ("vocab_size", "warmup_steps", "save_every", "eval_every", "seed", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config field {name}: must not be negative, found {getattr(self, name)}")
        if self.best_metric not in ("loss", "val_loss"):
            raise ConfigError(f"config field best_metric: expected loss or val_loss, found {self.best_metric!r}")
        if self.best_mode not in ("min", "max"):
            raise ConfigError(f"config field best_mode: expected min or max, found {self.best_mode!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"config field n_heads: {self.n_heads} does not divide d_model {self.d_model}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"config field dropout: expected 0 <= dropout < 1, found {self.dropout}")
        if not self.lr > 0:
            raise ConfigError(f"config field lr: must be positive, found {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"config field min_lr_ratio: expected 0..1, found {self.min_lr_ratio}")
        if not 0 <= self.val_fraction < 0.5:
            raise ConfigError(f"config field val_fraction: expected 0 <= x < 0.5, found {self.val_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """JSON text, keys sorted, for ``config.json``."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "APTConfig":
        """Build from a dict; unknown keys are refused by name.

        >>> APTConfig.from_dict({"d_model": 32, "n_heads": 2}).d_model
        32
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"config: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "APTConfig":
        """Read a ``config.json``."""
        try:
            data = json.loads(Path(path).read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read config ({e}); expected a JSON object of APTConfig fields") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of APTConfig fields")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "APTConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, d_ff=256, block_size=64, batch_size=8, lr=3e-3),
    "small": dict(d_model=256, n_layers=4, n_heads=8, d_ff=1024, block_size=128, batch_size=16, lr=1e-3),
    "base": dict(d_model=512, n_layers=8, n_heads=8, d_ff=2048, block_size=256, batch_size=16, lr=6e-4),
}


def preset(name: str, **overrides: Any) -> APTConfig:
    """A preset config (``tiny``, ``small``, ``base``) with overrides.

    >>> preset("tiny").d_model
    64
    """
    if name not in PRESETS:
        raise ConfigError(f"model size {name!r}: expected one of {sorted(PRESETS)}")
    return APTConfig(**{**PRESETS[name], **overrides})

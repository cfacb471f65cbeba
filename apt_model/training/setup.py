"""Building or reopening everything a training session needs: run, config, tokenizer, data,
model, optimizer and schedule, and the checks before a resume. ``trainer.py`` runs the loop.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from aptbundle import Run, RunError, VerifyError, building_run, check_name, environment_info, verify_files
from apt_model.errors import TrainingError
from apt_model.config import APTConfig
from apt_model.data import (SOURCE_FILE, ResumableSampler, builtin_corpus, describe_source, make_blocks,
                            read_text, resolve_data, split_blocks)
from apt_model.model import APTModel
from apt_model.tokenizer import CharTokenizer

TRAINER_NAME = "apt_model"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def pick_device(device: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda: no CUDA GPU is available here; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise TrainingError(f"--device {device!r}: expected auto, cpu or cuda")
    return torch.device(device)


@dataclass
class Session:
    """Everything the loop works on."""

    run: Run
    cfg: APTConfig
    tokenizer: CharTokenizer
    train_blocks: torch.Tensor
    val_blocks: torch.Tensor
    model: APTModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: ResumableSampler
    device: torch.device
    total_steps: int
    data_changed: bool = False


def load_blocks(text: str, tok: CharTokenizer, cfg: APTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return split_blocks(make_blocks(tok.encode(text), cfg.block_size), cfg.val_fraction)


def build(run: Run, cfg: APTConfig, tok: CharTokenizer, text: str, device: torch.device,
          rank: int = 0, world: int = 1) -> Session:
    """Model, optimizer and schedule for ``cfg``; weights drawn from the seeded torch RNG."""
    train_blocks, val_blocks = load_blocks(text, tok, cfg)
    sampler = ResumableSampler(len(train_blocks), cfg.batch_size, cfg.seed, rank, world)
    total = cfg.epochs * sampler.num_batches()
    model = APTModel(cfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(
        warmup_cosine, warmup=cfg.warmup_steps, total=total, min_ratio=cfg.min_lr_ratio))
    return Session(run, cfg, tok, train_blocks, val_blocks, model, opt, sched, sampler, device, total)


def new_run(run_dir: Path, cfg: APTConfig, data: str | Path | None) -> tuple[Run, APTConfig, CharTokenizer, str]:
    """Create the run folder: config, tokenizer, the corpus (or its record).

    It is built under a temporary name beside ``run_dir`` and renamed into place complete, so a
    process killed while creating it leaves no half-made run behind.
    """
    if Run.is_run(run_dir):
        run = Run.open(run_dir)
        at = f" (latest checkpoint {run.latest.name})" if run.latest else ""
        raise RunError(f"{run_dir}: already holds a run{at}; continue it with --resume-from latest"
                       f" or `aptbundle resume {run_dir}`, or choose a new --run-dir")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunError(f"{run_dir}: exists and is not empty; choose a new --run-dir")
    src = Path(data) if data is not None else builtin_corpus()
    text = read_text(src)
    tok = CharTokenizer.build(text)
    cfg = cfg.replace(vocab_size=len(tok))
    load_blocks(text, tok, cfg)  # a corpus too short to train on is refused before anything is created
    name = check_name(run_dir.resolve().name)
    with building_run(run_dir, name) as tmp:
        run = Run.create(tmp, trainer=TRAINER_NAME, name=name)
        rec = describe_source(src)
        if rec["copied"]:
            (run.path / "data").mkdir(exist_ok=True)
            shutil.copyfile(src, run.path / "data" / rec["name"])
            run.record_file(f"data/{rec['name']}")
        run.write_file(SOURCE_FILE, json.dumps(rec, indent=1, sort_keys=True).encode("utf-8"))
        run.write_file(CONFIG_FILE, cfg.to_json().encode("utf-8"))
        for fname, blob in tok.files().items():
            run.write_file(f"{TOKENIZER_DIR}/{fname}", blob)
        run.save_manifest()
    return Run.open(run_dir), cfg, tok, text


def reopen_run(run: Run, data: str | Path | None, allow_change: bool,
               overrides: dict) -> tuple[APTConfig, CharTokenizer, str, bool]:
    """Config and tokenizer from the run (never rebuilt), and the corpus to continue on.

    The run's own files were verified with the checkpoint, at the boundary of the resume.
    """
    for c in run.checkpoints:  # retiring that checkpoint would delete them: the manifest is crafted
        own = [f.path for f in run.manifest.files if f.path.startswith(c.folder + "/")
               and f.path.split("/")[0] in ("config.json", TOKENIZER_DIR, "data", "logs")]
        if own or c.folder.split("/")[0] in (TOKENIZER_DIR, "data", "logs"):
            raise TrainingError(f"{run.name}: checkpoint {c.name} claims the folder {c.folder!r}, which holds the"
                                " run's own files; the manifest is damaged or crafted")
    cfg = APTConfig.load(run.path / CONFIG_FILE)
    allowed = {"epochs", "save_every", "save_freq", "keep_last", "log_every"}
    bad = sorted(k for k, v in overrides.items() if v is not None and k not in allowed and v != getattr(cfg, k))
    if bad:
        raise TrainingError(f"{run.name}: {', '.join(bad)} cannot change when resuming (the run was built with"
                          f" {', '.join(f'{k}={getattr(cfg, k)}' for k in bad)}); start a new run to change them")
    cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None and k in allowed})
    tok = CharTokenizer.load(run.path / TOKENIZER_DIR)
    path, changed = resolve_data(run.path, data, allow_change)
    return cfg, tok, read_text(path), changed


def locate(resume_from: str, run_dir: Path | None) -> tuple[Path, str]:
    """``latest``/``best``/a checkpoint name with ``run_dir``, or a path to a run or checkpoint."""
    if resume_from in ("latest", "best") or (run_dir is not None and not Path(resume_from).exists()):
        if run_dir is None:
            raise TrainingError(f"--resume-from {resume_from}: also give --run-dir")
        return run_dir, resume_from
    p = Path(resume_from)
    if Run.is_run(p):
        return p, "latest"
    if (p / "trainer_state.json").exists() and Run.is_run(p.parent.parent):
        return p.parent.parent, p.name
    raise TrainingError(f"--resume-from {resume_from}: expected latest, best, a run folder or a checkpoint folder")


def verify_run_files(run: Run) -> None:
    """Verify the run's own files (config, tokenizer, data): a restart from scratch loads them."""
    rep = verify_files(run, [f.path for f in run.run_files()])
    if not rep.ok:
        raise VerifyError(rep.problems, what=f"{run.name} (not resumed)")


def warn_environment(run: Run, device: torch.device, quiet: bool) -> None:
    """Resuming is exact only on the same torch, thread count and device kind: say when not."""
    was, now = run.manifest.environment, environment_info(device.type)
    for key, label in (("torch", "torch version"), ("threads", "thread count"), ("device", "device")):
        if key in was and was.get(key) != now.get(key):
            log(quiet, f"warning: {label} differs: run written with {was.get(key)}, resuming with {now.get(key)};"
                        " the state is restored exactly, float rounding may differ")


def log(quiet: bool, msg: str) -> None:
    """A message for the person at the terminal, on stderr."""
    if not quiet:
        click.echo(msg, err=True)


def check_weights_fit(cfg: APTConfig, checkpoint) -> None:
    """Compare the config with the checkpoint's weights before any weight is allocated.

    The model is built on the meta device (shapes, no memory); a ``config.json`` asking for
    ``d_model`` 16384 beside a tiny checkpoint is refused here, not after 4 GB are allocated.
    """
    if not checkpoint.has("model.safetensors"):
        return  # sharded: DCP checks shapes itself
    from safetensors import safe_open

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in APTModel(cfg).state_dict().items()}
    with safe_open(str(checkpoint.folder / "model.safetensors"), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    wrong = [k for k, shape in found.items() if expected.get(k) != shape]
    if wrong:
        k = wrong[0]
        raise TrainingError(f"{checkpoint.name}/model.safetensors: {k} has shape {list(found[k])}, but"
                            f" config.json builds {list(expected.get(k, ())) or 'no such tensor'}"
                            f" ({len(wrong)} tensor(s) differ); the config and the weights do not belong together")

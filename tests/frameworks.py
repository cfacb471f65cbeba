"""Tiny real training runs of other frameworks, built from configs (nothing is downloaded).

Each function trains in this process (the frameworks are imported once per test session) and
is deterministic: the same call gives byte-identical weights, so a resumed run can be compared
with an uninterrupted one.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path


def token_data():
    """A dataset of n fixed random token sequences (16 tokens of 64), as the GPT-2 runs train on."""
    import torch

    class Data(torch.utils.data.Dataset):
        def __init__(self, n: int):
            self.x = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.x[i]}

    return Data


def hf_trainer(out: Path, *, resume: Path | None = None, steps: int = 40, save_total_limit: int | None = None,
               callbacks: list | None = None, **more_args):
    """A GPT-2 of 1 layer trained by the Hugging Face Trainer: a checkpoint every 10 steps, an
    evaluation every 10, the final model saved into ``out``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.utils import logging

    logging.set_verbosity_error()
    Data = token_data()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    args = TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=10, per_device_train_batch_size=4,
                             logging_steps=5, eval_strategy="steps", eval_steps=10, metric_for_best_model="loss",
                             save_total_limit=save_total_limit, report_to=[], use_cpu=True, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True, **more_args)
    trainer = Trainer(model=model, args=args, train_dataset=Data(160), eval_dataset=Data(16), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.save_model(str(out))
    return trainer


def accelerate_loop(out: Path, *, resume: Path | None = None, epochs: int = 4) -> None:
    """A small model trained with accelerate, ``save_state`` after each epoch
    (``checkpoints/checkpoint_K``), the final weights in ``out/final``."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration, set_seed

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    set_seed(0)
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(out),
                                                                    automatic_checkpoint_naming=True))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    start = 0
    if resume is not None:
        acc.load_state(str(resume))
        start = int(str(resume).rstrip("/").rsplit("_", 1)[1]) + 1
        acc.project_configuration.iteration = start
    for _ in range(start, epochs):
        for x, y in loader:
            loss = torch.nn.functional.mse_loss(model(x), y)
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
        acc.save_state()
    acc.save_model(model, str(out / "final"))


def lightning_fit(out: Path, *, ckpt_path: Path | None = None, steps: int = 40, weights_only: bool = False,
                  callbacks: list | None = None):
    """A linear model fitted by Lightning: a ``.ckpt`` every 10 steps and ``last.ckpt`` as a link."""
    import torch
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Model(L.LightningModule):
        def __init__(self, lr: float = 0.01):
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Linear(8, 1)

        def training_step(self, batch, i):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    cb = ModelCheckpoint(dirpath=str(out / "checkpoints"), every_n_train_steps=10, save_top_k=-1, save_last="link",
                         monitor="train_loss", mode="min", save_weights_only=weights_only)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(max_steps=steps, callbacks=[cb, *(callbacks or [])], default_root_dir=str(out), logger=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        model = Model()
        trainer.fit(model, loader, ckpt_path=str(ckpt_path) if ckpt_path else None)
    return trainer, model


def dcp_save(where: Path):
    """A default ``torch.distributed.checkpoint.save`` of a model and its optimizer; the state saved."""
    import torch
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(where))
    return {k: v.clone() for k, v in model.state_dict().items()}


def dcp_load(where: Path) -> dict:
    import torch
    import torch.distributed.checkpoint as dcp

    state = {"model": {k: torch.zeros_like(v) for k, v in torch.nn.Linear(8, 4).state_dict().items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(where))
    return state["model"]


def save_pretrained(where: Path):
    """A tiny GPT-2 saved with ``save_pretrained``; the model."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    model.save_pretrained(str(where))
    return model


def accelerate_steps(out: Path, *, steps: int = 20, every: int = 10) -> None:
    """accelerate with automatic checkpoint naming, ``save_state`` every ``every`` optimizer steps."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration, set_seed

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    set_seed(0)
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(out),
                                                                    automatic_checkpoint_naming=True))
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model, opt = acc.prepare(model, opt)
    for step in range(1, steps + 1):
        with acc.accumulate(model):  # what counts accelerate's own step
            loss = model(torch.randn(4, 8)).pow(2).mean()
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
        if step % every == 0:
            acc.save_state()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

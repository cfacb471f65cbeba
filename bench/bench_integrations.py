"""Benchmark (not a test): what backing a Hugging Face Trainer run up costs the training.

    python bench/bench_integrations.py [--steps 60] [--every 10] [--reps 3] [--width 256] [--layers 4]

The same run (a GPT-2 built from a config, a checkpoint every ``--every`` steps, into a local
store) is trained three ways, each ``--reps`` times, and the medians are printed side by side:

  plain      no backup (the baseline)
  callback   AptbundleCallback: a hard-link view on each save, the push in a background thread
  sync hook  what a user writes by hand: on each save, `init --update` and `push`, waited for

The time is that of the steps, from the first one's start to the last one's end with its save
(not the wait for the final push at the end of training); the stall is its excess over the
baseline, as a share of it (target for the callback: at most 2 %).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def train(out: Path, steps: int, every: int, width: int, layers: int, callbacks: list) -> float:
    """Seconds of training from the first step to the end of the last one (its save included)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.utils import logging

    logging.set_verbosity_error()
    Clock = _clock_class()

    class Data(torch.utils.data.Dataset):
        def __init__(self, n: int):
            self.x = torch.randint(0, 256, (n, 128), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.x[i]}

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=128, n_embd=width, n_layer=layers, n_head=4))
    args = TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=every, per_device_train_batch_size=8,
                             report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
                             logging_strategy="no", save_total_limit=3)
    clock = Clock()
    trainer = Trainer(model=model, args=args, train_dataset=Data(8 * steps), callbacks=[clock, *callbacks])
    trainer.train()
    return clock.seconds()


def _clock_class():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """Wall time from the first step's start to the last step's end: the steps and the saves
        between them, not the final wait for the last push at the end of training."""

        def on_step_begin(self, args, state, control, **kwargs):
            if not hasattr(self, "t0"):
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.t1 = time.perf_counter()

        def on_save(self, args, state, control, **kwargs):
            self.t1 = time.perf_counter()  # the save after the last step belongs to it

        def seconds(self) -> float:
            return self.t1 - self.t0

    return Clock


def main() -> None:
    from transformers import TrainerCallback

    from aptbundle.integrations.transformers import AptbundleCallback
    from aptbundle.layouts.adopt import adopt, update
    from aptbundle.format.run import Run
    from aptbundle.store.push import push

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()

    class SyncHook(TrainerCallback):
        def __init__(self, store):
            self.store = store

        def on_save(self, a, state, control, **kwargs):
            out = Path(a.output_dir)
            update(out) if Run.is_run(out) else adopt(out)
            push(out, self.store, threads=1, level=1)

    work = Path(tempfile.mkdtemp(prefix="bench-integrations-"))
    times: dict[str, list[float]] = {"plain": [], "callback": [], "sync hook": []}
    try:
        for rep in range(args.reps):
            for kind in times:
                out, store = work / f"{kind}-{rep}" / "run", work / f"{kind}-{rep}" / "store"
                cbs = {"plain": [], "callback": [AptbundleCallback(store)], "sync hook": [SyncHook(store)]}[kind]
                times[kind].append(train(out, args.steps, args.every, args.width, args.layers, cbs))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(times["plain"])
    print(f"Hugging Face Trainer, {args.steps} steps, a checkpoint every {args.every} (GPT-2 width {args.width},"
          f" {args.layers} layers), median of {args.reps}")
    print(f"  {'how':<11}{'train s':>9}{'stall':>9}")
    for kind, ts in times.items():
        m = statistics.median(ts)
        print(f"  {kind:<11}{m:>9.2f}{(m - base) / base * 100:>8.1f}%")


if __name__ == "__main__":
    main()

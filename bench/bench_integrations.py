"""Benchmark (not a test): what backing a Hugging Face Trainer run up costs the training.

    python bench/bench_integrations.py [--steps 60] [--every 10] [--reps 7] [--width 256] [--layers 4]
                                       [--torch-threads N] [--kinds plain,again,callback,thread,sync]

The same run (a GPT-2 built from a config, a checkpoint every ``--every`` steps, into a local
store) is trained in up to five ways, each ``--reps`` times, interleaved (each way first in turn,
the disk synced between runs):

  plain      no backup (the baseline)
  again      no backup either: a second baseline, whose "stall" is the noise of the machine
  callback   AptbundleCallback: a hard-link view on each save, the push in a process of its own
             at the lowest priority (what the callback does)
  thread     the same, with the push in a thread of the training process
             (APTBUNDLE_BACKUP_IN_PROCESS=1, the fallback where no process can be started)
  sync       what a user writes by hand: on each save, `init --update` and `push`, waited for

Columns:
  train s     median time of the steps, from the first one's start to the last one's end with
              its save
  stall       the median over reps of each run's excess over the plain run of the same rep, as a
              share of it, with the lowest and highest (the target for the callback: at most 2 %)
  best s      the fastest run's time, and its excess over the fastest plain run: the machine's
              noise only ever adds time, so the fastest runs show the callback's own cost best
  final s     the wait at the end of training for the last push (the callbacks make it before
              the process goes)
  lag s       the median, over the saves, of the time from a save to the moment a version
              holding it was in the store; "end" when that came only after training ended
  in time     how many of the saves reached the store before training ended

``--torch-threads 1`` leaves a core to everything else, as training on a GPU does (its training
thread mostly waits for the device); by default torch takes every core, the worst case for a
backup, which then gets only the CPU time training leaves. Each backed-up store is checked to
hold the run's final checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

KINDS = ("plain", "again", "callback", "thread", "sync")


def train(out: Path, steps: int, every: int, width: int, layers: int, callbacks: list) -> dict:
    """Train once; the clock's readings (``seconds`` of the steps, ``final`` wait, ``saves``:
    the wall-clock time of each save, ``end``: when the steps ended)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()

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
    Clock, Saves = _clock_class()
    clock, saves = Clock(), Saves()
    trainer = Trainer(model=model, args=args, train_dataset=Data(8 * steps), callbacks=[saves, *callbacks, clock])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return {"seconds": clock.t1 - clock.t0, "final": time.perf_counter() - clock.t1, "saves": saves.times,
            "end": clock.wall_end}


def _clock_class():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """Wall time from the first step's start to the last step's end: the steps and the saves
        between them (this callback comes after the others: a save's hooks count), not the
        final wait for the last push at the end of training."""

        def on_step_begin(self, args, state, control, **kwargs):
            if not hasattr(self, "t0"):
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.t1, self.wall_end = time.perf_counter(), time.time()

        def on_save(self, args, state, control, **kwargs):
            self.t1, self.wall_end = time.perf_counter(), time.time()  # the save after the last step belongs to it

    class Saves(TrainerCallback):
        """When each save was written (this callback comes before the others)."""

        def __init__(self):
            self.times: list[float] = []

        def on_save(self, args, state, control, **kwargs):
            self.times.append(time.time())

    return Clock, Saves


def _pushed(store: Path) -> list[float]:
    """When each version of the run landed in the store (its ref's times)."""
    from aptbundle.store import layout, refs

    return [v.time for v in refs.parse_ref((store / layout.ref("run")).read_bytes(), "ref")]


def _check_final(store: Path, checkpoint: str) -> None:
    """The store's newest version lists the run's last checkpoint (the backups were made)."""
    from aptbundle.format.manifest import parse_manifest
    from aptbundle.store import layout, refs

    digest = refs.parse_ref((store / layout.ref("run")).read_bytes(), "ref")[-1].digest
    names = [c.name for c in parse_manifest((store / layout.manifest(digest)).read_bytes()).checkpoints]
    if checkpoint not in names:
        raise SystemExit(f"{store}: the newest version lists {names}, not {checkpoint}: a backup failed")


def main() -> None:
    from transformers import TrainerCallback

    from aptbundle.format.run import Run
    from aptbundle.integrations.transformers import AptbundleCallback
    from aptbundle.layouts.adopt import adopt, update
    from aptbundle.store.push import push

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--torch-threads", type=int, default=0, help="torch's threads (default: every core)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="which ways to train, of " + ",".join(KINDS))
    args = ap.parse_args()
    kinds = tuple(k for k in KINDS if k in args.kinds.split(","))
    if "plain" not in kinds:
        raise SystemExit("--kinds must include plain: it is the baseline")
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    class SyncHook(TrainerCallback):
        def __init__(self, store):
            self.store = store

        def on_save(self, a, state, control, **kwargs):
            out = Path(a.output_dir)
            update(out) if Run.is_run(out) else adopt(out)
            push(out, self.store, threads=1, level=1)

    work = Path(tempfile.mkdtemp(prefix="bench-integrations-"))
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    try:
        for rep in range(args.reps):
            for kind in kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]:  # each kind first in turn
                os.sync()  # the previous run's writes are not flushed during this one
                out, store = work / f"{kind}-{rep}" / "run", work / f"{kind}-{rep}" / "store"
                cbs = {"plain": [], "again": [], "callback": [AptbundleCallback(store)],
                       "thread": [AptbundleCallback(store)], "sync": [SyncHook(store)]}[kind]
                os.environ["APTBUNDLE_BACKUP_IN_PROCESS"] = "1" if kind == "thread" else "0"
                r = train(out, args.steps, args.every, args.width, args.layers, cbs)
                if kind not in ("plain", "again"):
                    _check_final(store, f"checkpoint-{args.steps}")
                    r["pushed"] = _pushed(store)
                runs[kind].append(r)
                shutil.rmtree(work / f"{kind}-{rep}")
    finally:
        os.environ.pop("APTBUNDLE_BACKUP_IN_PROCESS", None)
        shutil.rmtree(work, ignore_errors=True)

    import torch

    print(f"Hugging Face Trainer, {args.steps} steps, a checkpoint every {args.every} (GPT-2 width {args.width},"
          f" {args.layers} layers), {args.reps} reps; {os.cpu_count()} cores, torch on {torch.get_num_threads()}")
    print(f"  {'how':<10}{'train s':>8}{'stall':>8}{'(low..high)':>15}{'best s':>8}{'stall':>8}{'final s':>9}"
          f"{'lag s':>7}{'in time':>9}")
    plain = [r["seconds"] for r in runs["plain"]]
    best_plain = min(plain)
    for kind, rs in runs.items():
        stalls = [(r["seconds"] - p) / p * 100 for r, p in zip(rs, plain)]
        lag, in_time = _lags(rs) if kind not in ("plain", "again") else ("", "")
        best = min(r["seconds"] for r in rs)
        print(f"  {kind:<10}{statistics.median(r['seconds'] for r in rs):>8.2f}{statistics.median(stalls):>7.1f}%"
              f"{f'({min(stalls):.1f}..{max(stalls):.1f})':>15}{best:>8.2f}{(best - best_plain) / best_plain * 100:>7.1f}%"
              f"{statistics.median(r['final'] for r in rs):>9.2f}"
              f"{lag:>7}{in_time:>9}")


def _lags(rs: list[dict]) -> tuple[str, str]:
    """The median lag from a save to its version in the store, and how many saves were in the
    store before training ended (over every rep)."""
    lags, early, total = [], 0, 0
    for r in rs:
        for t in r["saves"][:-1]:  # the last save is the end of training: the final push takes it
            total += 1
            landed = next((v for v in r["pushed"] if v >= t), None)
            if landed is not None and landed <= r["end"]:
                early += 1
                lags.append(landed - t)
            else:
                lags.append(float("inf"))
    med = statistics.median(lags) if lags else float("inf")
    return ("end" if med == float("inf") else f"{med:.1f}"), f"{early}/{total}"


if __name__ == "__main__":
    main()

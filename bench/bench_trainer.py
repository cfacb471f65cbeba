"""Benchmark (not a test): training throughput, checkpoint size and save time of the presets.

    python bench/bench_trainer.py [--sizes tiny small] [--steps 30]

For each preset it trains on the built-in corpus for a number of steps and reports tokens/s,
then saves the full training state with the Checkpointer a few times and reports the
checkpoint's size and the save time, beside the time of a bare ``torch.save`` of the same
state dicts (the baseline: no safetensors, no hashing, no fsync, no manifest). Last, the training
stall per checkpoint: how long the training thread waits in a synchronous save against a
``background=True`` (``--async-save``) save of the same state.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from aptbundle import Checkpointer, Run
from apt_model.config import preset
from apt_model.data import builtin_corpus, read_text
from apt_model.tokenizer import CharTokenizer
from apt_model.training.setup import build


def bench(size: str, steps: int, saves: int, work: Path) -> dict:
    text = read_text(builtin_corpus())
    tok = CharTokenizer.build(text)
    cfg = preset(size, vocab_size=len(tok), epochs=100)
    torch.manual_seed(0)
    run = Run.create(work / f"bench-{size}", trainer="apt_model")
    s = build(run, cfg, tok, text, torch.device("cpu"))
    s.model.train()
    it = iter(())
    epoch = 0
    done = 0
    t0 = None
    while done < steps + 2:
        try:
            idx = next(it)
        except StopIteration:
            it = s.sampler.batches(epoch)
            epoch += 1
            continue
        if done == 2:
            t0 = time.perf_counter()  # two warm-up steps
        batch = s.train_blocks[idx]
        _, loss = s.model(batch[:, :-1], batch[:, 1:])
        s.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), 1.0)
        s.optimizer.step()
        s.scheduler.step()
        done += 1
    elapsed = time.perf_counter() - t0
    tokens = steps * cfg.batch_size * cfg.block_size
    states = dict(model=s.model, optimizer=s.optimizer, scheduler=s.scheduler, keep_last=1)
    cm = Checkpointer(run, **states)
    times, base = [], []
    for i in range(saves):
        t = time.perf_counter()
        cm.save(step=i + 1, epoch=0, trainer_state={"loss_history": []}, metrics={"loss": loss.item()})
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
        buf = io.BytesIO()
        torch.save({"model": s.model.state_dict(), "opt": s.optimizer.state_dict(),
                    "sched": s.scheduler.state_dict(), "rng": torch.get_rng_state()}, buf)
        base.append(time.perf_counter() - t)
    stall_sync, stall_async = [], []
    modes = {False: cm, True: Checkpointer(run, mode="async", **states)}
    for i in range(saves):
        for background, out in ((False, stall_sync), (True, stall_async)):
            modes[True].wait()
            t = time.perf_counter()
            modes[background].save(step=100 + 2 * i + background, epoch=0, trainer_state={"loss_history": []},
                                   metrics={"loss": 1.0})
            out.append(time.perf_counter() - t)  # what the training thread waits for
    modes[True].wait()
    ck = run.checkpoint_dir(run.manifest.latest)
    size_bytes = sum(p.stat().st_size for p in ck.iterdir())
    return {"size": size, "params": s.model.num_parameters(), "tok_s": tokens / elapsed,
            "step_ms": elapsed / steps * 1000, "ckpt_bytes": size_bytes,
            "save_s": statistics.median(times), "torch_save_s": statistics.median(base),
            "stall_sync": statistics.median(stall_sync), "stall_async": statistics.median(stall_async)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--saves", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="aptbench-", dir=os.environ.get("TMPDIR")) as d:
        for size in args.sizes:
            rows.append(bench(size, args.steps, args.saves, Path(d)))
    print(f"{'preset':<7}{'params':>11}{'tokens/s':>11}{'ms/step':>9}{'ckpt MB':>9}{'save s':>9}"
          f"{'torch.save s':>14}{'ratio':>7}")
    for r in rows:
        print(f"{r['size']:<7}{r['params']:>11,}{r['tok_s']:>11,.0f}{r['step_ms']:>9.1f}"
              f"{r['ckpt_bytes'] / 1e6:>9.2f}{r['save_s']:>9.3f}{r['torch_save_s']:>14.3f}"
              f"{r['save_s'] / r['torch_save_s']:>7.2f}")
    print(f"\n{'preset':<7}{'sync save stall s':>19}{'--async-save stall s':>22}{'ratio':>7}")
    for r in rows:
        print(f"{r['size']:<7}{r['stall_sync']:>19.3f}{r['stall_async']:>22.3f}{r['stall_async'] / r['stall_sync']:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

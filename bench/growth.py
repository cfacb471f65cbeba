"""A run growing checkpoint by checkpoint, backed up after each one by aptbundle, restic and borg.

Used by ``bench_store.py --only growth``. Three scenarios on a GPT-2 built from a config
(6.9M parameters: vocabulary 8192, width 256, 6 blocks; AdamW, warm-up then cosine, 240 steps,
a checkpoint every 40):

  full    every weight trains
  frozen  the embeddings and the first 3 of the 6 blocks are frozen
  lora    rank-8 adapters on attention; the full model (base and adapters) is saved

Each checkpoint is a Hugging Face Trainer folder (``checkpoint-N/`` with ``model.safetensors``,
``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ``trainer_state.json``), adopted with
``aptbundle init`` and updated after each. After each checkpoint: ``push`` into a local store,
``restic backup`` and ``borg create`` of the same folder (each skipped, and said so, when not
installed). Printed per scenario: bytes added per backup (median), time per backup (median),
the store's size after the last, and the time to restore the whole run and the latest
checkpoint alone.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

STEPS, EVERY = 240, 40


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class LoRA:
    """Rank-r adapters beside a frozen Conv1D (GPT-2's attention projection)."""

    @staticmethod
    def wrap(conv, r: int = 8):
        import torch

        class Adapted(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.base = conv
                n_in, n_out = conv.weight.shape
                self.lora_a = torch.nn.Parameter(torch.randn(n_in, r) * 0.01)
                self.lora_b = torch.nn.Parameter(torch.zeros(r, n_out))

            def forward(self, x):
                return self.base(x) + (x @ self.lora_a) @ self.lora_b

        return Adapted()


def train(scenario: str, out: Path, on_checkpoint) -> None:
    """Train the scenario's model, writing a checkpoint every ``EVERY`` steps into ``out`` and
    calling ``on_checkpoint(step)`` after each."""
    import math

    import numpy as np
    import torch
    from safetensors.torch import save_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=8192, n_positions=256, n_embd=256, n_layer=6, n_head=4,
                                       bos_token_id=0, eos_token_id=0))
    if scenario == "frozen":
        for m in (model.transformer.wte, model.transformer.wpe, *model.transformer.h[:3]):
            m.requires_grad_(False)
    elif scenario == "lora":
        model.requires_grad_(False)
        for block in model.transformer.h:
            block.attn.c_attn = LoRA.wrap(block.attn.c_attn)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, STEPS) / STEPS)))
    from apt_model.data import builtin_corpus, read_text

    ids = torch.tensor(np.frombuffer(read_text(builtin_corpus()).encode(), dtype=np.uint8).astype(np.int64))
    g = torch.Generator().manual_seed(1)
    for step in range(1, STEPS + 1):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=g)
        batch = torch.stack([ids[s:s + 64] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % EVERY == 0:
            ck = out / f"checkpoint-{step}"
            ck.mkdir(parents=True)
            save_model(model, str(ck / "model.safetensors"))
            torch.save(opt.state_dict(), ck / "optimizer.pt")
            torch.save(sched.state_dict(), ck / "scheduler.pt")
            torch.save({"python": torch.random.get_rng_state()}, ck / "rng_state.pth")
            (ck / "trainer_state.json").write_text(json.dumps({
                "global_step": step, "epoch": step / STEPS, "max_steps": STEPS, "log_history":
                [{"step": step, "loss": loss.item()}], "best_metric": None, "best_model_checkpoint": None}))
            on_checkpoint(step)


def _timed(cmd: list[str], env: dict | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t


class Tools:
    """The backup tools of one scenario, each with its own repository under ``work``."""

    def __init__(self, work: Path):
        self.work = work
        self.env = dict(os.environ, RESTIC_PASSWORD="bench", BORG_PASSPHRASE="",
                        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes", BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")
        self.have = {t: shutil.which(t) is not None for t in ("restic", "borg")}
        self.repo = {"aptbundle": work / "store", "restic": work / "restic", "borg": work / "borg"}
        if self.have["restic"]:
            subprocess.run(["restic", "init", "-r", str(self.repo["restic"])], check=True, env=self.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.have["borg"]:
            subprocess.run(["borg", "init", "--encryption=none", str(self.repo["borg"])], check=True, env=self.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.added = {t: [] for t in self.repo}
        self.times = {t: [] for t in self.repo}

    def names(self) -> list[str]:
        return ["aptbundle"] + [t for t in ("restic", "borg") if self.have[t]]

    def backup(self, run: Path, step: int) -> None:
        from aptbundle.layouts.adopt import adopt, update
        from aptbundle.store.push import push

        before = {t: tree_size(r) if r.exists() else 0 for t, r in self.repo.items()}
        t = time.perf_counter()
        (update if (run / "aptrun.json").exists() else adopt)(run)
        push(run, self.repo["aptbundle"])
        self.times["aptbundle"].append(time.perf_counter() - t)
        if self.have["restic"]:
            self.times["restic"].append(_timed(["restic", "-r", str(self.repo["restic"]), "backup", "-q", "--host",
                                                "bench", str(run)], self.env))
        if self.have["borg"]:
            self.times["borg"].append(self._borg_create(run, step))
        for t in self.names():
            self.added[t].append(tree_size(self.repo[t]) - before[t])

    def _borg_create(self, run: Path, step: int) -> float:
        t = time.perf_counter()
        subprocess.run(["borg", "create", "--compression", "zstd,3", f"{self.repo['borg']}::s{step}", "."],
                       check=True, cwd=run, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t

    def restore(self, tool: str, run: Path, latest: str | None) -> float:
        from aptbundle.store.pull import pull

        dest = self.work / f"restore-{tool}-{latest or 'all'}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        t = time.perf_counter()
        if tool == "aptbundle":
            pull(self.repo["aptbundle"], run.name, dest, checkpoints="latest" if latest else "all")
        elif tool == "restic":
            cmd = ["restic", "-r", str(self.repo["restic"]), "restore", "latest", "--target", str(dest), "-q"]
            if latest:
                cmd += ["--include", str(run / latest)]
            subprocess.run(cmd, check=True, env=self.env, stdout=subprocess.DEVNULL)
        else:
            last = subprocess.run(["borg", "list", "--last", "1", "--format", "{archive}", str(self.repo["borg"])],
                                  check=True, env=self.env, capture_output=True, text=True).stdout.strip()
            subprocess.run(["borg", "extract", f"{self.repo['borg']}::{last}"] + ([latest] if latest else []),
                           check=True, cwd=dest, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t


def scenario(name: str, work: Path) -> dict:
    """Grow one scenario's run and back it up after each checkpoint; its figures per tool."""
    base = work / name
    run = base / "run"
    run.mkdir(parents=True)
    tools = Tools(base)
    train(name, run, lambda step: tools.backup(run, step))
    latest = f"checkpoint-{STEPS}"
    out = {}
    for t in tools.names():
        out[t] = {"store": tree_size(tools.repo[t]), "added": statistics.median(tools.added[t][1:]),
                  "added_all": tools.added[t], "time": statistics.median(tools.times[t]),
                  "restore_all": tools.restore(t, run, None), "restore_latest": tools.restore(t, run, latest)}
    out["raw"] = tree_size(run) - (run / "aptrun.json").stat().st_size
    out["checkpoint"] = tree_size(run / latest)
    return out


def report(name: str, res: dict) -> None:
    tools = [t for t in ("aptbundle", "restic", "borg") if t in res]
    missing = [t for t in ("restic", "borg") if t not in res]
    print(f"\n{name}: {res['raw'] / 1e6:.1f} MB raw in {STEPS // EVERY} checkpoints of {res['checkpoint'] / 1e6:.1f} MB"
          + (f"  ({', '.join(missing)} not installed: skipped)" if missing else ""))
    print(f"  {'':<34}" + "".join(f"{t:>12}" for t in tools))
    for key, label, unit in (("store", "store after the last checkpoint", 1e6), ("added", "MB added per checkpoint"
                             " (median)", 1e6), ("time", "s per backup (median)", 1),
                             ("restore_all", "s to restore the whole run", 1),
                             ("restore_latest", "s to restore the latest checkpoint", 1)):
        print(f"  {label:<34}" + "".join(f"{res[t][key] / unit:12.2f}" for t in tools))
    a = res["aptbundle"]
    for t in tools[1:]:
        r = res[t]
        print(f"  aptbundle / {t}: store {a['store'] / r['store']:.2f}x, added {a['added'] / r['added']:.2f}x,"
              f" time {a['time'] / r['time']:.2f}x, latest restore {a['restore_latest'] / r['restore_latest']:.2f}x")


def _tensors_of(work: Path) -> dict[str, bytes]:
    """The fp32 weights of the full scenario's last checkpoint, and the same in bf16."""
    import torch
    from safetensors.torch import load_file

    found = sorted(work.glob(f"full/run/checkpoint-{STEPS}/model.safetensors"))
    if found:
        weights = load_file(found[0])
    else:
        torch.manual_seed(0)
        weights = {"w": torch.randn(7_000_000) * 0.02}
    flat = torch.cat([v.reshape(-1).float() for v in weights.values()])
    return {"fp32": flat.numpy().tobytes(), "bf16": flat.to(torch.bfloat16).view(torch.uint16).numpy().tobytes()}


def decode_speed(work: Path, reps: int = 5) -> None:
    """Grouped objects decoded single-threaded, beside ZipNN decompressing the same bytes."""
    import hashlib

    from aptbundle.store.objects import MAX_OBJECT, decode, encode

    try:
        import zipnn
    except ImportError:
        zipnn = None
    print("\ngrouped decoding, one thread (best of %d)%s" % (reps, "" if zipnn else
                                                             "  (zipnn not installed: pip install --no-deps zipnn)"))
    for label, raw in _tensors_of(work).items():
        raw = raw[:MAX_OBJECT]
        width = 4 if label == "fp32" else 2
        body, _ = encode(raw, width, None)
        sha = hashlib.sha256(raw).hexdigest()

        def best(fn) -> float:
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return min(times)

        ours = best(lambda: decode(sha, body, "bench", None, verify=False))
        line = f"  {label} {len(raw) / 1e6:6.1f} MB: aptbundle ratio {len(raw) / len(body):5.3f} {len(raw) / ours / 1e9:5.2f} GB/s"
        if zipnn is not None:
            z = zipnn.ZipNN(input_format="byte", bytearray_dtype="float32" if width == 4 else "bfloat16", threads=1)
            comp = bytes(z.compress(bytearray(raw)))
            theirs = best(lambda: z.decompress(bytearray(comp)))  # it changes the buffer it is given: a copy
            line += (f"   ZipNN 0.5 ratio {len(raw) / len(comp):5.3f} {len(raw) / theirs / 1e9:5.2f} GB/s"
                     f"   speed ratio {theirs / ours:.2f}")
        print(line)


def scale(work: Path, big: int) -> None:
    """Push time of one new checkpoint into a store of 1,000 objects and one of ``big`` (generated keys)."""
    import hashlib

    import numpy as np
    from safetensors.numpy import save_file

    from aptbundle.layouts.adopt import adopt, update
    from aptbundle.store.push import push

    def checkpoint(run: Path, step: int) -> None:
        ck = run / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        rng = np.random.default_rng(step)
        save_file({f"t{i}": rng.standard_normal(250_000).astype(np.float32) for i in range(20)},
                  str(ck / "model.safetensors"))
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": 1, "log_history": []}))
        (update if (run / "aptrun.json").exists() else adopt)(run)

    print("\npush of one new checkpoint (20 tensors, 20 MB) into a store already holding N objects (median of 3):")
    times = {}
    for n in (1000, big):
        base = work / f"scale-{n}"
        run, store = base / "run", base / "store"
        checkpoint(run, 1)
        push(run, store)
        t = time.perf_counter()
        for i in range(256):
            (store / "objects/sha256" / f"{i:02x}").mkdir(parents=True, exist_ok=True)
        for i in range(n):  # other runs' objects: empty files under their keys
            d = hashlib.sha256(b"%d" % i).hexdigest()
            os.close(os.open(store / "objects/sha256" / d[:2] / d, os.O_CREAT | os.O_WRONLY, 0o644))
        made = time.perf_counter() - t
        runs = []
        for step in (2, 3, 4):
            checkpoint(run, step)
            t = time.perf_counter()
            push(run, store)
            runs.append(time.perf_counter() - t)
        times[n] = statistics.median(runs)
        print(f"  {n:>9,} objects: {times[n]:6.2f} s per push   (the keys took {made:.0f} s to make)")
        shutil.rmtree(base, ignore_errors=True)
    print(f"  ratio {times[big] / times[1000]:.2f}x (target < 2x)")

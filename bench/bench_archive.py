"""Benchmark (not a test): aptbundle pack / unpack / verify against tar | zstd and sha256sum.

    python bench/bench_archive.py [--size 0.65] [--reps 3] [--small-files 0] [--dense]

It builds a realistic run on the fly: a GPT-like model sized so that weights plus AdamW moments
come to about ``--size`` GB, after a few real AdamW steps, saved with the Checkpointer with a
tokenizer and config. Then, on the same files and in the same process, it times:

  pack     aptbundle pack                vs  tar -cf - RUN | zstd -3 -T0 > x.tar.zst   (no hashing)
  unpack   aptbundle unpack (verifies)   vs  zstd -d -c x.tar.zst | tar -x ; sha256sum -c
  verify   aptbundle verify RUN          vs  sha256sum -c over the run's files
  verify   aptbundle verify ARCHIVE      vs  zstd -d | tar -xO > /dev/null  (reading it, no check)

and prints each median beside its baseline with the ratio, the archive sizes and each process's
peak RSS. ``--small-files N`` adds a run of N small files to show per-file overhead.
``--other DIR`` also times the same commands from another checkout of aptbundle (for example a
``git worktree`` of the previous release), so a change is measured against what it replaces.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable


def timed(cmd: str, cwd: Path | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes, the largest process of the command) of a shell command."""
    t = time.perf_counter()
    p = subprocess.Popen(["bash", "-o", "pipefail", "-c", cmd], cwd=cwd)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark command failed: {cmd}")
    return dt, ru.ru_maxrss * 1024


def make_model_run(root: Path, size_gb: float) -> Path:
    """A run whose checkpoint (weights + AdamW moments) is about ``size_gb`` GB."""
    import torch

    from aptbundle import Checkpointer, Run

    torch.manual_seed(0)
    d, vocab = 768, 8192
    params = int(size_gb * 1e9 / 12)  # fp32 weights + two fp32 moments
    layers = max(1, round((params - vocab * d) / (12 * d * d)))

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(d)
            self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
            self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

        def forward(self, x):
            h = self.ln(x)
            q, k, v = self.qkv(h).chunk(3, -1)
            x = x + self.proj(torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, -1) @ v)
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    class GPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, d)
            self.layers = torch.nn.ModuleList(Layer() for _ in range(layers))
            self.head = torch.nn.Linear(d, vocab, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            x = self.emb(idx)
            for layer in self.layers:
                x = layer(x)
            return self.head(x)

    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for _ in range(3):
        idx = torch.randint(0, vocab, (2, 32))
        loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    run = Run.create(root / "gptrun", trainer="apt_model")
    import json

    vocab_json = json.dumps({f"tok{i}": i for i in range(vocab)}).encode()
    run.write_file("tokenizer/vocab.json", vocab_json)
    run.write_file("config.json", json.dumps({"d_model": d, "n_layers": layers, "vocab": vocab}).encode())
    run.save_manifest()
    Checkpointer(run, model=model, optimizer=opt, scheduler=sched).save(step=3, epoch=0,
                                                                        metrics={"loss": loss.item()})
    print(f"built run: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {layers} layers,"
          f" {run.manifest.total_size() / 1e9:.2f} GB in {len(run.manifest.files)} files", file=sys.stderr)
    return run.path


def make_small_files_run(root: Path, n: int) -> Path:  # no torch: fine in the measuring process
    from aptbundle import Run

    run = Run.create(root / "smallrun", trainer=None)
    shard = run.path / "data" / "shards"
    shard.mkdir(parents=True)
    for i in range(n):
        (shard / f"s{i:06d}.txt").write_bytes(os.urandom(512).hex().encode())
    for i in range(n):
        run.record_file(f"data/shards/s{i:06d}.txt")
    run.save_manifest()
    print(f"built run: {n} small files, {run.manifest.total_size() / 1e6:.1f} MB", file=sys.stderr)
    return run.path


def sums_file(run: Path, dest: Path) -> Path:
    from aptbundle import load_manifest

    dest.write_text("".join(f"{f.sha256}  {f.path}\n" for f in load_manifest(run).files))
    return dest


def _ours(work: Path, run: Path, ours: Path, extra: str, tag: str, other: str | None) -> dict[str, tuple]:
    """One round of aptbundle's own commands (from ``other``'s checkout when given)."""
    # from inside the other checkout, so that its package, not the one beside this script, is imported
    py = f"cd {Path(other).resolve()} && PYTHONPATH=. {PY}" if other else PY
    for d in (f"u{tag}",):
        shutil.rmtree(work / d, ignore_errors=True)
        (work / d).mkdir()
    return {
        "pack": timed(f"{py} -m aptbundle pack {run} -o {ours} --force -q{extra} > /dev/null"),
        "unpack": timed(f"{py} -m aptbundle unpack {ours} -C {work / f'u{tag}'} -q > /dev/null"),
        "vrun": timed(f"{py} -m aptbundle verify {run} -q > /dev/null"),
        "varc": timed(f"{py} -m aptbundle verify {ours} -q > /dev/null"),
    }


def bench_run(run: Path, work: Path, reps: int, dense: bool, other: str | None = None) -> list[tuple]:
    name = run.name
    sums = sums_file(run, work / f"{name}.sha256")
    ours = work / f"{name}.aptrun.tar.zst"
    base = work / f"{name}.tar.zst"
    extra = " --dense" if dense else ""
    results: dict[str, list] = {}
    for _ in range(reps):
        results.setdefault("pack_b", []).append(timed(f"tar -cf - -C {run.parent} {name} | zstd -3 -T0 -q -f -o {base}"))
        shutil.rmtree(work / "u_b", ignore_errors=True)
        (work / "u_b").mkdir()
        results.setdefault("unpack_b", []).append(timed(
            f"zstd -d -c -q {base} | tar -x -C {work / 'u_b'} && cd {work / 'u_b' / name} && sha256sum -c --quiet {sums}"))
        results.setdefault("vrun_b", []).append(timed(f"cd {run} && sha256sum -c --quiet {sums}"))
        for k, v in _ours(work, run, ours, extra, "", None).items():
            results.setdefault(k, []).append(v)
        results.setdefault("varc_b", []).append(timed(f"zstd -d -c -q {ours} | tar -xO > /dev/null"))
        if other:
            other_arc = work / f"other-{name}.aptrun.tar.zst"
            for k, v in _ours(work, run, other_arc, extra, "o", other).items():
                results.setdefault(f"{k}_o", []).append(v)
    med = {k: (statistics.median(t for t, _ in v), max(m for _, m in v)) for k, v in results.items()}
    size_ours, size_base = ours.stat().st_size, base.stat().st_size
    rows = [
        ("pack" + (" --dense" if dense else ""), "pack", "pack_b", "tar | zstd -3 -T0"),
        ("unpack + verify", "unpack", "unpack_b", "zstd -d | tar -x; sha256sum -c"),
        ("verify run", "vrun", "vrun_b", "sha256sum -c"),
        ("verify archive", "varc", "varc_b", "zstd -d | tar -xO > /dev/null"),
    ]
    total = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
    print(f"\nrun {name}: {total / 1e6:.1f} MB; archive {size_ours / 1e6:.1f} MB vs tar|zstd -3 {size_base / 1e6:.1f} MB"
          f" (ratio {size_ours / size_base:.3f}); median of {reps}")
    head = f"  {'operation':<18}{'aptbundle s':>12}{'baseline s':>12}{'ratio':>8}{'RSS MB':>9}{'base RSS':>10}"
    print(head + (f"{'other s':>9}{'ratio':>7}" if other else "") + "  baseline")
    for label, k, kb, what in rows:
        (t, m), (tb, mb) = med[k], med[kb]
        line = f"  {label:<18}{t:>12.2f}{tb:>12.2f}{t / tb:>8.2f}{m / 1e6:>9.0f}{mb / 1e6:>10.0f}"
        if other:
            to = med[f"{k}_o"][0]
            line += f"{to:>9.2f}{to / tb:>7.2f}"
        print(line + f"  {what}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=0.65, help="GB of checkpoint data in the model run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--small-files", type=int, default=0, help="also bench a run of N small files")
    ap.add_argument("--dense", action="store_true", help="pack with the --dense float codec")
    ap.add_argument("--workdir", default=None, help="where to build the runs (default: a temp folder)")
    ap.add_argument("--other", default=None, help="also time the commands of the aptbundle checkout in DIR")
    ap.add_argument("--build-only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:  # runs in a child, so the measuring process never holds the model's memory
        make_model_run(Path(args.build_only), args.size)
        return 0
    for tool in ("tar", "zstd", "sha256sum"):
        if shutil.which(tool) is None:
            raise SystemExit(f"the baseline needs `{tool}` on PATH")
    with tempfile.TemporaryDirectory(prefix="aptbench-", dir=args.workdir) as d:
        work = Path(d)
        if args.size > 0:
            subprocess.run([PY, __file__, "--build-only", str(work), "--size", str(args.size)], check=True)
            bench_run(work / "gptrun", work, args.reps, args.dense, args.other)
            shutil.rmtree(work / "gptrun")
        if args.small_files:
            bench_run(make_small_files_run(work, args.small_files), work, args.reps, args.dense, args.other)
    return 0


if __name__ == "__main__":
    sys.exit(main())

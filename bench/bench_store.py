"""Benchmark (not a test): the store against restic and borg, and push/pull against a plain copy.

    python bench/bench_store.py [--only growth|decode|scale|transfer|stall|dense] [--size 0.3] [--reps 3]

``growth`` (``growth.py``): a GPT-2 run grown checkpoint by checkpoint in three scenarios (full
training, frozen half, LoRA with the full model saved), backed up after each checkpoint by
aptbundle, restic and borg (skipped, and said so, when not installed: ``apt-get install restic
borgbackup``); bytes added, time per backup, restore of the whole run and of the latest
checkpoint. ``decode``: grouped objects decoded beside ZipNN's decompression of the same tensors
(``pip install --no-deps zipnn``; skipped when absent). ``scale``: one new checkpoint pushed into
a store holding 1,000 objects and one holding ``--scale`` (generated keys).

On a run built on the fly (a GPT-like model after a few AdamW steps, weights plus moments about
``--size`` GB; see ``bench_archive.make_model_run``), in the same process, it times:

  push   aptbundle push RUN STORE (hash, scan, zstd, write)  vs  fsspec put of the run's files
  pull   aptbundle pull STORE NAME (read, unzstd, hash, scan) vs  fsspec get of the same files
  again  a second push of the unchanged run (nothing to send)

into a local folder, and into S3 on a loopback moto server when moto is installed. Each figure
is the median of ``--reps`` into fresh destinations, printed beside its baseline with the
ratio (throughput of aptbundle / throughput of the copy; goal >= 0.9).

Then the training stall of ``--backup-to``: the same training (``--stall-preset``, a checkpoint
every few steps) with and without background pushes to a local store, wall time of each
(goal: <= 5 % slower). Last, the store's size for an fp32 and a bf16 run
beside ``tar | zstd -3`` of the same files.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_archive import make_model_run  # noqa: E402


def median_time(fn, reps: int) -> float:
    times = []
    for i in range(reps):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def row(label: str, ours: float, base: float, data: int, base_label: str) -> None:
    mb = data / 1e6
    print(f"{label:<26}{ours:8.2f} s {mb / ours:8.1f} MB/s   {base_label:<24}{base:8.2f} s {mb / base:8.1f} MB/s"
          f"   ratio {base / ours:5.2f}")


def bench_transfer(run: Path, work: Path, reps: int, store_of, fs, plain_of, tag: str) -> None:
    from aptbundle import load_manifest
    from aptbundle.store.pull import pull
    from aptbundle.store.push import push

    data = load_manifest(run).total_size()
    files = [f.path for f in load_manifest(run).files]

    def plain_put(i: int) -> None:
        dest = plain_of(f"put{i}")
        for rel in files:
            if "/" in rel:
                fs.makedirs(f"{dest}/{rel.rsplit('/', 1)[0]}", exist_ok=True)
            fs.put_file(str(run / rel), f"{dest}/{rel}")

    def plain_get(i: int) -> None:
        src = plain_of("put0")
        out = work / f"{tag}-get{i}"
        for rel in files:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{src}/{rel}", str(out / rel))

    t_put = median_time(plain_put, reps)
    t_push = median_time(lambda i: push(run, store_of(f"s{i}")), reps)
    row(f"push ({tag})", t_push, t_put, data, "fsspec put")
    t_again = median_time(lambda i: push(run, store_of("s0")), reps)
    print(f"{'push again, unchanged':<26}{t_again:8.2f} s  (sends the manifest only)")
    t_get = median_time(plain_get, reps)
    t_pull = median_time(lambda i: pull(store_of("s0"), run.name, work / f"{tag}-pull{i}"), reps)
    row(f"pull ({tag})", t_pull, t_get, data, "fsspec get")


def bench_stall(preset: str, reps: int, work: Path) -> None:
    def train(i: int, backup: bool) -> float:
        cmd = [sys.executable, "-m", "apt_model.training.trainer", "--run-dir", str(work / f"stall-{backup}-{i}"),
               "--model-size", preset, "--epochs", "1", "--save-every", "5", "-q"]
        if backup:
            cmd += ["--backup-to", str(work / f"stall-store-{i}")]
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        return time.perf_counter() - t

    plain, backed = [], []
    for i in range(reps):  # interleaved, so drifts of the machine hit both alike
        plain.append(train(i, False))
        backed.append(train(i, True))
    p, b = statistics.median(plain), statistics.median(backed)
    from aptbundle.store.maintain import list_store

    pushed = list_store(work / "stall-store-0")[0]
    print(f"training, {preset} preset, a checkpoint every 5 steps ({len(pushed['checkpoints'])} kept, all pushed):")
    print(f"  without backups {p:7.2f} s   with --backup-to {b:7.2f} s   stall {100 * (b - p) / p:+.1f} %")


def bench_dense(run32: Path, work: Path) -> None:
    """The store's size for an fp32 and a bf16 run beside ``tar | zstd -3`` of the same files."""
    import torch
    from safetensors.torch import load_file, save_file

    from aptbundle import Run
    from aptbundle.store.push import push

    run16 = work / "bf16run"
    shutil.copytree(run32, run16)
    for p in run16.rglob("model.safetensors"):
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(p).items()}, p)
    for p in run16.rglob("optimizer.pt"):
        p.unlink()
    run = Run.open(run16)
    run.manifest.files = [f for f in run.manifest.files if not f.path.endswith("optimizer.pt")]
    for f in list(run.manifest.files):
        run.record_file(f.path)
    run.save_manifest()
    for label, src in (("fp32", run32), ("bf16", run16)):
        store = work / f"dense-{label}"
        push(src, store)
        size = tree_size(store / "objects") + tree_size(store / "recipes")
        tz = work / f"{label}.tar.zst"
        subprocess.run(f"tar -cf - -C {src.parent} {src.name} | zstd -3 -T0 -q -o {tz}", shell=True, check=True)
        data = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
        print(f"{label}: data {data / 1e6:8.1f} MB   tar|zstd -3 {tz.stat().st_size / 1e6:8.1f} MB   store"
              f" {size / 1e6:8.1f} MB ({100 * size / tz.stat().st_size:.0f} % of zstd)")


def s3_server():
    try:
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError:
        return None, None
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}",
                       "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    import fsspec.config

    fsspec.config.set_conf_env(fsspec.config.conf)
    fs = s3fs.S3FileSystem(endpoint_url=f"http://{host}:{port}")
    fs.mkdir("bench")
    return server, fs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=0.3, help="GB of checkpoint data in the model run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-s3", action="store_true", help="skip the loopback S3 round")
    ap.add_argument("--stall-preset", default="small", help="preset trained for the backup stall")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--only", choices=["growth", "decode", "scale", "transfer", "stall", "dense"], default=None,
                    help="run one part")
    ap.add_argument("--scenarios", default="full,frozen,lora", help="growth: which scenarios")
    ap.add_argument("--scale", type=int, default=1_000_000, help="scale: objects in the big store")
    args = ap.parse_args()
    import fsspec

    import growth

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-store-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.only in (None, "growth"):
            for name in args.scenarios.split(","):
                growth.report(name, growth.scenario(name, work))
        if args.only in (None, "decode"):
            growth.decode_speed(work)
        if args.only in (None, "scale"):
            growth.scale(work, args.scale)
        if args.only in ("growth", "decode", "scale"):
            return 0
        run = make_model_run(work, args.size)
        print(f"{os.cpu_count()} cores; run of {tree_size(run) / 1e6:.0f} MB; medians of {args.reps}")
        local = fsspec.filesystem("file")
        if args.only in (None, "transfer"):
            bench_transfer(run, work, args.reps, lambda k: str(work / f"store-{k}"), local,
                           lambda k: str(work / f"plain-{k}"), "local")
        if not args.no_s3 and args.only in (None, "transfer"):
            server, fs = s3_server()
            if fs is None:
                print("(no moto/s3fs: the S3 round is skipped)")
            else:
                try:
                    bench_transfer(run, work, args.reps, lambda k: f"s3://bench/store-{k}", fs,
                                   lambda k: f"bench/plain-{k}", "s3 loopback")
                finally:
                    server.stop()
        if args.only in (None, "stall"):
            bench_stall(args.stall_preset, args.reps, work)
        if args.only in (None, "dense"):
            bench_dense(run, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

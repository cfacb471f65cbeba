"""Benchmark (not a test): the content scan's time and peak memory on large and hostile pickles.

    python bench/bench_scan.py [--pickle-mb 48] [--checkpoint-gb 4] [--only NAME]

Each case is a folder holding one file, adopted with ``aptbundle init``; then ``aptbundle verify``
runs in a child process (so its peak RSS is its own) and is printed beside the baseline measured
in the same run: loading the same file with ``torch.load(weights_only=False)`` (what the scan
protects), or for the big checkpoint ``sha256sum`` of it (reading it at all).

  plain      a torch.save zip whose data.pkl is --pickle-mb of plain data (a Lightning loop state)
  lists      data.pkl of --pickle-mb EMPTY_LIST opcodes: one new object per byte, the worst case
             for memory of any unpickler (the loader pays it too)
  marks      data.pkl of --pickle-mb MARK opcodes: the mark stack at its deepest
  memo       data.pkl that memoizes and fetches the same object over and over
  checkpoint a --checkpoint-gb torch.save checkpoint (one float32 tensor): the scan reads the
             pickle and skips the tensor's bytes while hashing them
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


# A small launcher runs the command and reports its peak RSS: a child forked straight from this
# (large) process would report this process's size as its own (Linux keeps the high-water mark
# across fork and exec).
_LAUNCH = ("import resource, subprocess, sys, time; t = time.perf_counter();"
           " r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL);"
           " print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,"
           " r.returncode)")


def timed(cmd: list[str], cwd: Path) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MB and exit status of a command in a child process."""
    out = subprocess.run([PY, "-c", _LAUNCH, *cmd], cwd=cwd, capture_output=True, text=True, check=True).stdout
    s, mb, code = out.split()
    return float(s), float(mb), int(code)


def torch_zip(payload: bytes) -> bytes:
    """A torch.save-shaped zip whose data.pkl is ``payload`` (no tensors)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in (("archive/data.pkl", payload), ("archive/version", b"3\n")):
            z.writestr(name, data)
    return buf.getvalue()


def pickles(mb: float) -> dict[str, bytes]:
    import pickle

    n = int(mb * (1 << 20))
    plain = {"epoch": 3, "global_step": 30, "loops": {"fit": [float(i) for i in range(n // 9)]}}
    memo = b"\x80\x02]q\x00" + b"h\x000" * ((n - 8) // 3) + b"."  # BINGET 0, POP: a memo hit per 3 bytes
    return {"plain": pickle.dumps(plain, protocol=4), "lists": b"\x80\x04" + b"]" * n + b".",
            "marks": b"\x80\x02" + b"(" * n + b"N.", "memo": memo}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pickle-mb", type=float, default=48)
    ap.add_argument("--checkpoint-gb", type=float, default=4)
    ap.add_argument("--only", default=None, help="one case: plain, lists, marks, memo or checkpoint")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scan-"))
    aptbundle = [PY, "-m", "aptbundle"]
    load = [PY, "-c", "import sys, torch\ntry: torch.load(sys.argv[1], weights_only=False)\nexcept Exception: pass"]
    rows = []
    try:
        cases = pickles(args.pickle_mb)
        for name, data in cases.items():
            if args.only not in (None, name):
                continue
            folder = work / name
            folder.mkdir()
            (folder / "optimizer.pt").write_bytes(torch_zip(data))
            subprocess.run([*aptbundle, "init", str(folder), "-q"], check=True, stderr=subprocess.DEVNULL)
            s, rss, code = timed([*aptbundle, "verify", str(folder), "-q"], work)
            bs, brss, _ = timed([*load, str(folder / "optimizer.pt")], work)
            rows.append((f"{name} ({len(data) / (1 << 20):.0f} MiB pickle)", s, rss, code, "torch.load", bs, brss))
        if args.only in (None, "checkpoint"):
            import torch

            folder = work / "checkpoint"
            folder.mkdir()
            numel = int(args.checkpoint_gb * (1 << 30)) // 4
            torch.save({"w": torch.zeros(numel), "step": 1}, folder / "model.pt")
            subprocess.run([*aptbundle, "init", str(folder), "-q"], check=True, stderr=subprocess.DEVNULL)
            s, rss, code = timed([*aptbundle, "verify", str(folder), "-q"], work)
            bs, brss, _ = timed(["sha256sum", str(folder / "model.pt")], work)
            gb = (folder / "model.pt").stat().st_size / 1e9
            rows.append((f"checkpoint ({gb:.1f} GB)", s, rss, code, "sha256sum", bs, brss))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'case':<28}{'verify s':>10}{'peak MB':>9}{'exit':>6}   {'baseline':<11}{'s':>8}{'peak MB':>9}"
          f"{'time x':>8}")
    for name, s, rss, code, base, bs, brss in rows:
        print(f"{name:<28}{s:>10.2f}{rss:>9.0f}{code:>6}   {base:<11}{bs:>8.2f}{brss:>9.0f}{s / bs:>8.2f}")


if __name__ == "__main__":
    main()

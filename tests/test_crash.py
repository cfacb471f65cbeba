"""Crashes and concurrency: killed trainers, packs and unpacks lose nothing; a full disk is a
clear error; two writers cannot share a run; packing a run in training gives a consistent archive.
"""

import os
import random
import resource
import shutil
import signal
import subprocess
import time

import pytest

from aptbundle.format.manifest import load_manifest
from aptbundle.format.run import Run
from aptbundle.format.verify import verify_files, verify_run
from conftest import APTBUNDLE, TRAINER, cli, no_traceback, sh

from conftest import KILL_ROUNDS  # noqa: E402


def _limit_fsize(limit):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.mark.slow
def test_random_sigkills_lose_nothing_and_end_bit_exact(tmp_path):
    rnd = random.Random(2024)
    epochs = "2" if KILL_ROUNDS < 10 else "6"  # long enough for every round to be cut short
    straight = tmp_path / "straight"
    r = sh(*TRAINER, "--run-dir", straight, "--epochs", epochs, "-q", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "r"
    args = ["--run-dir", str(run_dir), "--epochs", epochs, "--save-every", "3", "--keep-last", "2", "-q"]
    kills, lost, best_step = 0, 0, 0
    for round_ in range(KILL_ROUNDS):
        extra = ["--resume-from", "latest"] if Run.is_run(run_dir) else []
        p = subprocess.Popen([*TRAINER, *args, *extra], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            p.wait(timeout=rnd.uniform(1.0, 3.0))  # torch takes ~1.5 s to import: kills land all over
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
        else:
            assert p.returncode == 0, p.stderr.read()
            break
        if Run.is_run(run_dir):
            run = Run.open(run_dir)
            latest = run.latest.step if run.latest else 0
            if latest < best_step:
                lost += 1
            best_step = max(best_step, latest)
            listed = [f.path for f in run.manifest.files if f.path.startswith("checkpoints/")]
            assert verify_files(run, listed).problems == [], "a listed checkpoint is incomplete"
    r = sh(*TRAINER, *args, "--resume-from", "latest", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert lost == 0
    final = load_manifest(run_dir).latest
    straight = straight / "checkpoints" / load_manifest(straight).latest
    assert final == straight.name
    for f in ("model.safetensors", "optimizer.pt"):
        assert (run_dir / "checkpoints" / final / f).read_bytes() == (straight / f).read_bytes()
    assert verify_run(Run.open(run_dir)).problems == []
    print(f"\nkills survived: {kills}, checkpoints lost: {lost}")


def wait_for(cond, timeout=30.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.002)


def big_run(tmp_path, mb=400):
    run = Run.create(tmp_path / "big", trainer=None)
    run.write_file("blob.dat", os.urandom(1 << 20) * mb)
    run.save_manifest()
    return run.path


def test_sigkill_during_pack_and_unpack_leaves_nothing_at_the_name(tmp_path):
    run_dir = big_run(tmp_path)
    out = tmp_path / "big.aptrun.tar.zst"
    p = subprocess.Popen([*APTBUNDLE, "pack", str(run_dir), "-o", str(out), "-q"])
    wait_for(lambda: any(x.name.startswith(".aptrun-tmp-") and x.name.endswith("-big.aptrun.tar.zst")
                         for x in tmp_path.iterdir()))
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists()
    r = sh(*APTBUNDLE, "pack", run_dir, "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    leftovers = [x for x in list(tmp_path.iterdir()) + list(run_dir.iterdir()) if x.name.startswith(".aptrun-tmp")]
    assert leftovers == []  # the killed pack's temporaries were cleaned by the next one

    dest = tmp_path / "dest"
    p = subprocess.Popen([*APTBUNDLE, "unpack", str(out), "-C", str(dest), "-q"])
    wait_for(lambda: dest.is_dir() and any(x.name.startswith(".aptrun-tmp-") and x.name.endswith("-big")
                                           for x in dest.iterdir()))
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (dest / "big").exists()
    r = sh(*APTBUNDLE, "unpack", out, "-C", dest, "-q")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(dest)) == ["big"]
    assert (dest / "big" / "blob.dat").read_bytes() == (run_dir / "blob.dat").read_bytes()


def test_full_disk_is_a_clear_error_and_loses_no_checkpoint(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "r")  # finished at step 56: a third epoch needs a new checkpoint
    before = {f.path: f.sha256 for f in load_manifest(tmp_path / "r").files}
    p = subprocess.run([*TRAINER, "--run-dir", str(tmp_path / "r"), "--resume-from", "latest", "--epochs", "3",
                        "--save-every", "2", "-q"], cwd=tmp_path, capture_output=True, text=True,
                       preexec_fn=_limit_fsize(200_000))
    assert p.returncode == 1 and no_traceback(p.stderr), p.stderr
    assert "too large" in p.stderr.lower() and "intact" in p.stderr
    run = Run.open(tmp_path / "r")
    assert run.latest.step == 56
    assert {f.path: f.sha256 for f in run.manifest.files} == before
    listed = [f.path for f in run.manifest.files if f.path.startswith("checkpoints/")]
    assert verify_files(run, listed).problems == []
    r = sh(*TRAINER, "--run-dir", tmp_path / "r", "--resume-from", "latest", "--epochs", "3",
           "--stop-at-step", "58", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert verify_run(Run.open(tmp_path / "r")).problems == []

    out = tmp_path / "r.aptrun.tar.zst"
    p = subprocess.run([*APTBUNDLE, "pack", str(tmp_path / "r"), "-o", str(out)], capture_output=True, text=True,
                       preexec_fn=_limit_fsize(100_000))
    assert p.returncode == 1 and no_traceback(p.stderr) and "too large" in p.stderr.lower(), p.stderr
    assert not out.exists() and not [x for x in tmp_path.iterdir() if x.name.startswith(".aptrun-tmp")]
    assert sh(*APTBUNDLE, "pack", tmp_path / "r", "-o", out, "-q").returncode == 0
    dest = tmp_path / "d"
    dest.mkdir()
    p = subprocess.run([*APTBUNDLE, "unpack", str(out), "-C", str(dest)], capture_output=True, text=True,
                       preexec_fn=_limit_fsize(100_000))
    assert p.returncode == 1 and no_traceback(p.stderr), p.stderr
    assert os.listdir(dest) == []


def test_pack_while_training_gives_consistent_archives(tmp_path):
    run_dir = tmp_path / "r"
    p = subprocess.Popen([*TRAINER, "--run-dir", str(run_dir), "--epochs", "30", "--save-every", "2",
                          "--keep-last", "1", "-q"], cwd=tmp_path)
    try:
        deadline = time.time() + 60
        while not (Run.is_run(run_dir) and Run.open(run_dir).latest) and time.time() < deadline:
            time.sleep(0.05)
        steps: list[int] = []
        deadline = time.time() + 90
        i = 0
        while (len(steps) < 5 or steps[-1] == steps[0]) and time.time() < deadline:
            i += 1
            out = tmp_path / f"snap{i}.aptrun.tar.zst"
            r = cli("pack", run_dir, "-o", out, "--json", "-q")
            assert r.exit_code == 0, r.output
            assert cli("verify", out).exit_code == 0
            dest = tmp_path / f"u{i}"
            assert cli("unpack", out, "-C", dest, "-q").exit_code == 0
            unpacked = Run.open(dest / "r")
            assert verify_run(unpacked).problems == []
            steps.append(unpacked.latest.step)
            time.sleep(0.2)
        assert p.poll() is None, "the trainer should still be running"
        assert len(steps) >= 5
        assert steps == sorted(steps) and steps[-1] > steps[0]
    finally:
        p.kill()
        p.wait()

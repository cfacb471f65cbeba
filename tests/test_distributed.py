"""torchrun: DDP training on CPU (gloo), exact 2 -> 2 resume, 2 -> 1 and 1 -> 2 with resharding."""

import json
import shutil
import sys

import pytest

from aptbundle.format.manifest import load_manifest
from aptbundle.format.run import Run
from conftest import cli, sh, trainer

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "apt_model.training.trainer"]
COMMON = ["--epochs", "2", "--save-every", "5", "--keep-last", "10", "-q"]


def state(run, name=None):
    man = load_manifest(run)
    return json.loads((run / "checkpoints" / (name or man.latest) / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def straight2(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    r = sh(*TORCHRUN, "--run-dir", base / "straight", *COMMON, cwd=base, timeout=300)
    assert r.returncode == 0, r.stderr
    return base / "straight"


@pytest.fixture(scope="module")
def stopped2(tmp_path_factory):
    """A run of two processes stopped at step 7 (tests continue copies of it)."""
    base = tmp_path_factory.mktemp("ddp-stopped")
    r = sh(*TORCHRUN, "--run-dir", base / "r", *COMMON, "--stop-at-step", "7", cwd=base, timeout=300)
    assert r.returncode == 0, r.stderr
    return base / "r"


def test_two_processes_stop_and_resume_bit_exact(straight2, stopped2, tmp_path):
    shutil.copytree(stopped2, tmp_path / "r")
    ck = load_manifest(tmp_path / "r").latest
    files = sorted(p.name for p in (tmp_path / "r/checkpoints" / ck).iterdir())
    assert "rng_state-rank0.pt" in files and "rng_state-rank1.pt" in files
    assert state(tmp_path / "r")["world_size"] == 2
    r = sh(*TORCHRUN, "--run-dir", tmp_path / "r", "--resume-from", "latest", "-q", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    a = straight2 / "checkpoints" / load_manifest(straight2).latest
    b = tmp_path / "r/checkpoints" / load_manifest(tmp_path / "r").latest
    assert a.name == b.name
    for f in ("model.safetensors", "optimizer.pt", "scheduler.pt"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert state(straight2)["loss_history"] == state(tmp_path / "r")["loss_history"]
    assert cli("verify", tmp_path / "r").exit_code == 0
    assert load_manifest(tmp_path / "r").history[-1]["processes"] == 2


def test_two_processes_resume_in_one(stopped2, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(stopped2, run)
    before = state(run)["loss_history"]
    r = trainer("--run-dir", run, "--resume-from", "latest", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 process(es), now 1" in r.stderr
    after = state(run)["loss_history"]
    assert after[: len(before)] == before
    # the loss carries on from where it was, not from an untrained model's
    assert after[len(before)] < before[0] and sum(after[-5:]) / 5 < sum(before[-5:]) / 5


@pytest.mark.parametrize("start,then", [(2, 1), (1, 2)])
def test_sharded_checkpoints_reshard_and_travel(tmp_path, start, then):
    run = tmp_path / "r"
    args = ["--run-dir", run, *COMMON, "--stop-at-step", "6", "--sharded"]
    r = sh(*TORCHRUN, *args, cwd=tmp_path, timeout=300) if start == 2 else trainer(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ck = run / "checkpoints" / load_manifest(run).latest
    assert (ck / "dcp" / ".metadata").is_file() and not (ck / "model.safetensors").exists()
    assert str(tmp_path).encode() not in (ck / "dcp" / ".metadata").read_bytes()
    # a sharded checkpoint packs, unpacks and verifies like any other
    assert cli("pack", run, "-o", tmp_path / "r.aptrun.tar.zst", "-q").exit_code == 0
    assert cli("unpack", tmp_path / "r.aptrun.tar.zst", "-C", tmp_path / "moved", "-q").exit_code == 0
    moved = tmp_path / "moved" / "r"
    assert cli("verify", moved).exit_code == 0
    args = ["--run-dir", moved, "--resume-from", "latest", "--sharded"]
    r = sh(*TORCHRUN, *args, cwd=tmp_path, timeout=300) if then == 2 else trainer(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    final = state(moved)
    assert final["world_size"] == then and final["epoch"] == 2
    losses = final["loss_history"]
    assert losses[7] < losses[0]  # trains on from the restored weights


def test_sharded_metadata_is_scanned_before_dcp_reads_it(tmp_path):
    import os
    import pickle

    run = tmp_path / "r"
    r = trainer("--run-dir", run, *COMMON, "--stop-at-step", "3", "--sharded", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rel = f"checkpoints/{load_manifest(run).latest}/dcp/.metadata"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    (run / rel).write_bytes(pickle.dumps(Boom()))
    r_ = Run.open(run)
    r_.record_file(rel)
    r_.save_manifest()
    r = trainer("--run-dir", run, "--resume-from", "latest", cwd=tmp_path)
    assert r.returncode == 1 and ".metadata" in r.stderr and "system" in r.stderr
    assert cli("verify", run).exit_code == 1
    assert not (tmp_path / "PWNED").exists()

"""`aptbundle unpack X && aptbundle resume` on "another machine", the way a user does it."""

import json
import shutil

import pytest

from aptbundle.format.manifest import load_manifest
from aptbundle.commands.resume import find_run
from aptbundle.ground.errors import ResumeError
from conftest import APTBUNDLE, TRAINER, cli, no_traceback, sh


def test_move_a_run_to_another_machine_and_resume_bit_exactly(tmp_path, tiny_run):
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    a.mkdir()
    (b / "home").mkdir(parents=True)
    (b / "work").mkdir()
    env_a = {"HOME": str(a)}
    env_b = {"HOME": str(b / "home")}
    r = sh(*TRAINER, "--run-dir", "outputs/run1", "--epochs", "2", "--save-every", "10", "--keep-last", "10",
           "--stop-at-step", "17", "-q", cwd=a, env=env_a)
    assert r.returncode == 0, r.stderr
    archive = tmp_path / "run1.aptrun.tar.zst"
    r = sh(*APTBUNDLE, "pack", "outputs/run1", "-o", archive, cwd=a, env=env_a)
    assert r.returncode == 0, r.stderr
    shutil.rmtree(a)  # machine A is gone
    r = sh(*APTBUNDLE, "unpack", archive, cwd=b / "work", env=env_b)
    assert r.returncode == 0 and r.stdout.strip() == "run1", r.stderr
    r = sh(*APTBUNDLE, "resume", cwd=b / "work", env=env_b)
    assert r.returncode == 0, r.stderr
    assert "resuming run1 from step-00000017" in r.stderr
    run = b / "work" / "run1"
    straight = tiny_run / "checkpoints" / load_manifest(tiny_run).latest
    resumed = run / "checkpoints" / load_manifest(run).latest
    assert straight.name == resumed.name
    assert (straight / "model.safetensors").read_bytes() == (resumed / "model.safetensors").read_bytes()
    assert (straight / "optimizer.pt").read_bytes() == (resumed / "optimizer.pt").read_bytes()
    assert cli("verify", run).exit_code == 0
    needle = str(a).encode()
    for p in run.rglob("*"):
        if p.is_file():
            assert needle not in p.read_bytes(), f"{p} holds the old machine's path"
    hist = load_manifest(run).history
    assert len(hist) == 2 and hist[1]["start_step"] == 17 and hist[1]["device"] == "cpu"
    assert not (b / "home").exists() or not any((b / "home").iterdir())  # nothing written to ~


def test_find_run_rules(tmp_path, tiny_run):
    with pytest.raises(ResumeError, match="no run found"):
        find_run(cwd=tmp_path)
    shutil.copytree(tiny_run, tmp_path / "outputs" / "run1")
    assert find_run(cwd=tmp_path) == tmp_path / "outputs" / "run1"
    shutil.copytree(tiny_run, tmp_path / "run2")
    with pytest.raises(ResumeError, match="several runs found.*aptbundle resume"):
        find_run(cwd=tmp_path)
    assert find_run(cwd=tmp_path / "run2") == tmp_path / "run2"


def test_resume_refuses_unknown_trainer_and_damaged_checkpoint(run_copy):
    man = json.loads((run_copy / "aptrun.json").read_text())
    orig = dict(man)
    man["trainer"] = "os.system"
    (run_copy / "aptrun.json").write_text(json.dumps(man))
    r = cli("resume", run_copy)
    assert r.exit_code == 1 and "not installed" in r.stderr and no_traceback(r.output)
    (run_copy / "aptrun.json").write_text(json.dumps(orig))
    latest = run_copy / "checkpoints" / orig["latest"] / "model.safetensors"
    data = bytearray(latest.read_bytes())
    data[-5] ^= 0xFF
    latest.write_bytes(bytes(data))
    r = cli("resume", run_copy)
    assert r.exit_code == 1 and "model.safetensors" in r.stderr and no_traceback(r.output)
    r = cli("resume", run_copy, "--from", "step-00000010", "--stop-at-step", "12", "--quiet")
    assert r.exit_code == 0, r.output


def test_resume_to_more_epochs_continues_the_loss(run_copy):
    before = load_manifest(run_copy)
    r = cli("resume", run_copy, "--epochs", "3", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["finished"] and out["global_step"] > before.checkpoints[-1].step
    after = load_manifest(run_copy)
    assert after.checkpoints[-1].epoch == 3
    assert after.checkpoints[-1].metrics["loss"] < before.checkpoints[0].metrics["loss"]

"""Checkpointer: complete state round-trips, retention, verification, crash safety."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from aptbundle.state.checkpoint import Checkpointer
from aptbundle.ground.errors import CheckpointError, VerifyError
from aptbundle.format.manifest import load_manifest
from aptbundle.format.run import Run
from aptbundle.format.verify import verify_files, verify_run
from conftest import KILL_ROUNDS, cli, no_traceback


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.mid = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.relu(self.mid(self.emb(x))))


def trained(steps=3):
    torch.manual_seed(0)
    m = Tied()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(steps):
        loss = m(torch.randint(0, 50, (4, 8))).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return m, opt, sched


def test_tied_model_round_trips_exactly(tmp_path):
    m, opt, sched = trained()
    run = Run.create(tmp_path / "run", trainer="t")
    Checkpointer(run, model=m, optimizer=opt, scheduler=sched).save(step=3, epoch=0, metrics={"loss": 1.0})
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run/checkpoints/step-00000003/model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len([k for k in keys if k in ("emb.weight", "head.weight")]) == 1  # stored once

    m2 = Tied()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    state = Checkpointer(run, model=m2, optimizer=opt2, scheduler=sched2).load("latest")
    assert state["step"] == 3
    assert m2.head.weight is m2.emb.weight  # still tied
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for pid in s1["state"]:
        for key in s1["state"][pid]:
            assert torch.equal(torch.as_tensor(s1["state"][pid][key]), torch.as_tensor(s2["state"][pid][key]))
    assert sched.state_dict() == sched2.state_dict()


def test_rng_state_is_restored(tmp_path):
    m, opt, _ = trained(1)
    cm = Checkpointer(Run.create(tmp_path / "run", trainer="t"), model=m, optimizer=opt)
    torch.manual_seed(7)
    random.seed(7)
    cm.save(step=1, epoch=0)
    expect = (torch.rand(5), random.random())
    torch.manual_seed(99)
    random.seed(99)
    Checkpointer(cm.run, model=m).load("latest")
    assert torch.equal(torch.rand(5), expect[0]) and random.random() == expect[1]


def test_retention_keeps_last_k_best_and_latest(tmp_path):
    m, opt, sched = trained(1)
    run = Run.create(tmp_path / "run", trainer="t")
    cm = Checkpointer(run, model=m, optimizer=opt, scheduler=sched, keep_last=2)
    losses = [5.0, 0.5, 4.0, 3.0, 2.0]
    for i, loss in enumerate(losses, 1):
        cm.save(step=i * 10, epoch=0, metrics={"loss": loss})
    names = [c.name for c in Run.open(tmp_path / "run").checkpoints]
    assert names == ["step-00000020", "step-00000040", "step-00000050"]
    assert run.manifest.best.name == "step-00000020" and run.manifest.latest == "step-00000050"
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == names
    assert verify_run(Run.open(tmp_path / "run")).problems == []


def test_load_refuses_damaged_checkpoint(tmp_path):
    m, opt, _ = trained(1)
    cm = Checkpointer(Run.create(tmp_path / "run", trainer="t"), model=m, optimizer=opt)
    cm.save(step=1, epoch=0)
    p = tmp_path / "run/checkpoints/step-00000001/optimizer.pt"
    data = bytearray(p.read_bytes())
    data[-30] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match="optimizer.pt"):
        cm.load("latest")
    with pytest.raises(CheckpointError, match="keep_last"):
        Checkpointer(tmp_path / "run", keep_last=0)


@pytest.mark.parametrize("action", ["flip", "delete", "add", "truncate"])
def test_verify_cli_names_every_damaged_file(run_copy, action):
    man = load_manifest(run_copy)
    assert cli("verify", run_copy).exit_code == 0
    targets = [f.path for f in man.files]
    for rel in targets if action != "add" else ["checkpoints/step-00000010/extra.dat"]:
        p = run_copy / rel
        if action == "flip":
            data = bytearray(p.read_bytes())
            data[len(data) // 2] ^= 0x01
            p.write_bytes(bytes(data))
        elif action == "delete":
            p.unlink()
        elif action == "truncate":
            p.write_bytes(p.read_bytes()[:-1])
        else:
            p.write_bytes(b"surprise")
    r = cli("verify", run_copy)
    assert r.exit_code == 1
    assert no_traceback(r.output)
    expected = targets if action != "add" else ["checkpoints/step-00000010/extra.dat"]
    for rel in expected:
        assert rel in r.stderr, f"{rel} not named"
    r = cli("verify", run_copy, "--json")
    import json

    report = json.loads(r.stdout)
    assert not report["ok"] and {p["path"] for p in report["problems"]} >= set(expected)


SAVER = textwrap.dedent("""
    import sys, torch
    from aptbundle.format.run import Run
    from aptbundle.state.checkpoint import Checkpointer
    torch.manual_seed(0)
    path = sys.argv[1]
    run = Run.open(path) if Run.is_run(path) else Run.create(path, trainer="t")
    with run.lock():
        run.recover()
        m = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
        opt = torch.optim.AdamW(m.parameters())
        cm = Checkpointer(run, model=m, optimizer=opt, keep_last=2)
        m(torch.randn(2, 512)).sum().backward(); opt.step()
        start = run.latest.step if run.latest else 0
        print("ready", flush=True)
        for step in range(start + 1, start + 10000):
            cm.save(step=step, epoch=0, metrics={"loss": 1.0 / step},
                    run_files={"logs/metrics.jsonl": b"x" * step})
""")


@pytest.mark.slow
def test_sigkill_inside_save_never_breaks_the_manifest(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    run_dir = tmp_path / "run"
    rnd = random.Random(1)
    kills = 0
    for _ in range(max(2, KILL_ROUNDS)):
        p = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(rnd.uniform(0.05, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        man = load_manifest(run_dir)  # always loadable
        run = Run.open(run_dir)
        assert man.latest is not None
        listed = [f.path for f in man.files if f.path.startswith("checkpoints/")]
        assert verify_files(run, listed).problems == []  # every listed checkpoint file is complete
        for c in man.checkpoints:
            assert (run_dir / "checkpoints" / c.name / "model.safetensors").is_file()
    assert kills == max(2, KILL_ROUNDS)
    run = Run.open(run_dir)
    with run.lock():
        run.recover()
    problems = verify_run(run).problems
    assert all(p.path == "logs/metrics.jsonl" for p in problems), problems


@pytest.mark.parametrize("step", ["rename", "write_file", "record_file", "save_manifest"])
def test_a_failure_at_any_step_of_a_commit_leaves_a_run_that_verifies(tmp_path, monkeypatch, step):
    """A commit renames the checkpoint in, rewrites the run's own files, lists everything and
    saves the manifest; a failure at any of these puts the run back as it was."""
    import aptbundle.state.checkpoint as ck

    m, opt, sched = trained(1)
    run = Run.create(tmp_path / "run", trainer="t")
    cm = Checkpointer(run, model=m, optimizer=opt, scheduler=sched)
    cm.save(step=1, epoch=0, metrics={"loss": 1.0}, run_files={"logs/metrics.jsonl": b'{"step": 1}\n'})
    before = load_manifest(run.path)
    calls = {"n": 0}

    def failing(real):
        def f(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2 or step != "rename":  # the rename of the new checkpoint, or the first call
                raise OSError(28, "No space left on device")
            return real(*a, **k)
        return f

    if step == "rename":
        monkeypatch.setattr(ck.os, "replace", failing(os.replace))
    else:
        monkeypatch.setattr(Run, step, failing(getattr(Run, step)))
    with pytest.raises(OSError):
        cm.save(step=2, epoch=0, metrics={"loss": 0.5}, run_files={"logs/metrics.jsonl": b'{"step": 2}\n'})
    monkeypatch.undo()
    assert load_manifest(run.path) == before and run.manifest.latest == "step-00000001"
    assert verify_run(Run.open(run.path)).problems == []
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["step-00000001"]
    cm.save(step=2, epoch=0, metrics={"loss": 0.5}, run_files={"logs/metrics.jsonl": b'{"step": 2}\n'})
    assert verify_run(Run.open(run.path)).ok and Run.open(run.path).latest.step == 2

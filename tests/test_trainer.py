"""The trainer: bit-exact resume, falling loss, generation, signals, data travelling with the run."""

import json
import signal
import subprocess
import sys
import time

import torch

from aptbundle.format.manifest import load_manifest
from aptbundle.format.run import Run
from aptbundle.format.verify import verify_run
from conftest import TRAINER, cli, no_traceback, sh, trainer


def ckpt(run, name=None):
    m = load_manifest(run)
    return run / "checkpoints" / (name or m.latest)


def test_stop_and_resume_is_bit_exact(tmp_path, tiny_run):
    # straight through: the session fixture (2 epochs, save_every 10); interrupted: stop mid-epoch
    r = trainer("--run-dir", tmp_path / "b", "--epochs", "2", "--save-every", "10", "--keep-last", "10",
           "--stop-at-step", "13", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    state = json.loads((ckpt(tmp_path / "b") / "trainer_state.json").read_text())
    assert state["global_step"] == 13 and 0 < state["position"] < state["steps_per_epoch"]
    r = trainer("--run-dir", tmp_path / "b", "--resume-from", "latest", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    a, b = ckpt(tiny_run), ckpt(tmp_path / "b")
    assert a.name == b.name
    for f in ("model.safetensors", "optimizer.pt", "scheduler.pt"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    sa = json.loads((a / "trainer_state.json").read_text())
    sb = json.loads((b / "trainer_state.json").read_text())
    assert sa["loss_history"] == sb["loss_history"]
    assert (tiny_run / "logs/metrics.jsonl").read_bytes() == (tmp_path / "b/logs/metrics.jsonl").read_bytes()
    assert cli("verify", tmp_path / "b").exit_code == 0
    hist = load_manifest(tmp_path / "b").history
    assert [(h["start_step"], h["stop_step"]) for h in hist] == [(0, 13), (13, sa["global_step"])]


def test_loss_falls_and_generation_prints_text(tiny_run):
    losses = json.loads((ckpt(tiny_run) / "trainer_state.json").read_text())["loss_history"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first * 0.7, (first, last)
    r = sh(sys.executable, "-m", "apt_model.generate", tiny_run, "--prompt", "The ", "--max-new-tokens", "40")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The ") and len(r.stdout.strip()) >= 30


def test_sigterm_saves_and_exits_143(tmp_path):
    p = subprocess.Popen([*TRAINER, "--run-dir", str(tmp_path / "r"), "--epochs", "50", "--quiet"],
                         cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "r" / "checkpoints").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err  # saved, then stopped by SIGTERM: 128 + 15
    run = Run.open(tmp_path / "r")
    assert run.latest is not None and verify_run(run).problems == []
    state = json.loads((ckpt(tmp_path / "r") / "trainer_state.json").read_text())
    assert state["global_step"] == run.latest.step
    assert not (tmp_path / ".cache").exists()  # nothing written to the working directory


def test_existing_run_and_bad_flags_are_clear_errors(tiny_run, tmp_path):
    r = trainer("--run-dir", tiny_run, "--epochs", "1", cwd=tmp_path)
    assert r.returncode == 1 and "--resume-from latest" in r.stderr and no_traceback(r.stderr)
    r = trainer("--run-dir", tmp_path / "x", "--batch-size", "0", cwd=tmp_path)
    assert r.returncode == 2 and "--batch-size" in r.stderr and no_traceback(r.stderr)  # misuse: refused first
    assert not (tmp_path / "x").exists()
    r = trainer("--run-dir", tmp_path / "x", "--model-size", "huge", cwd=tmp_path)
    assert r.returncode == 2
    r = trainer("--run-dir", tmp_path / "y", "--data", tmp_path / "missing.txt", cwd=tmp_path)
    assert r.returncode == 1 and "missing.txt" in r.stderr and no_traceback(r.stderr)


def test_data_travels_and_changed_data_is_refused(tmp_path):
    corpus = tmp_path / "my corpus.txt"
    corpus.write_text(("the quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸。\n" * 60), "utf-8")
    r = trainer("--run-dir", tmp_path / "r", "--data", corpus, "--epochs", "2", "--stop-at-step", "5", "-q",
           cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r/data/my corpus.txt").read_bytes() == corpus.read_bytes()
    src = json.loads((tmp_path / "r/data/source.json").read_text())
    assert src["copied"] and str(tmp_path) not in json.dumps(src)
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text("utf-8").replace("fox", "cat"), "utf-8")
    r = trainer("--run-dir", tmp_path / "r", "--resume-from", "latest", "--data", other, cwd=tmp_path)
    assert r.returncode == 1 and "--allow-data-change" in r.stderr and no_traceback(r.stderr)
    r = trainer("--run-dir", tmp_path / "r", "--resume-from", "latest", "--data", other,
           "--allow-data-change", "--stop-at-step", "8", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    corpus.unlink()  # the run's own copy is enough to resume
    r = trainer("--run-dir", tmp_path / "r", "--resume-from", "latest", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_seed_checkpoint_api_and_load_model(tmp_path, tiny_run):
    from apt_model.config import preset
    from apt_model.model import APTModel
    from apt_model.tokenizer import CharTokenizer
    from apt_model.training.checkpoint import CheckpointManager, load_model
    from apt_model.utils.cache_manager import CacheManager

    tok = CharTokenizer.build("abc def")
    cfg = preset("tiny", vocab_size=len(tok))
    model = APTModel(cfg)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cm = CheckpointManager(tmp_path / "seed")
    path = cm.save_checkpoint(model, opt, sched, epoch=1, global_step=7, loss_history=[3.0, 2.0],
                              metrics={"loss": 2.0}, tokenizer=tok, config=cfg, is_best=True)
    assert path.name == "step-00000007" and (path / "model.safetensors").is_file()
    m2 = APTModel(cfg)
    epoch, step, losses, metrics = cm.load_checkpoint(m2, torch.optim.AdamW(m2.parameters()), None)
    assert (epoch, step, losses, metrics["loss"]) == (1, 7, [3.0, 2.0], 2.0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values()))
    loaded, tok2, cfg2 = load_model(tmp_path / "seed")
    assert cfg2 == cfg and tok2.vocab == tok.vocab
    loaded, _, _ = load_model(ckpt(tiny_run))
    assert loaded.num_parameters() > 0

    cache = CacheManager(tmp_path / ".cache")
    t = cache.get_cache_path("temp")
    assert t == tmp_path / ".cache" / "temp" and t.is_dir()
    (t / "junk").write_text("x")
    assert cache.clean_cache("temp") == 1 and not list(t.iterdir())
    assert CacheManager().root == __import__("pathlib").Path.cwd() / ".cache"


def test_second_trainer_on_the_same_run_is_refused(tmp_path):
    p = subprocess.Popen([*TRAINER, "--run-dir", str(tmp_path / "r"), "--epochs", "50", "-q"], cwd=tmp_path)
    try:
        deadline = time.time() + 60
        while not (Run.is_run(tmp_path / "r") and Run.open(tmp_path / "r").latest) and time.time() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "r" / ".aptrun.lock").exists()
        r = trainer("--run-dir", tmp_path / "r", "--resume-from", "latest", cwd=tmp_path)  # in here: p is the other
        assert r.returncode == 1 and "being written by process" in r.stderr, r.stderr
        r = cli("resume", tmp_path / "r")
        assert r.exit_code == 1 and "being written by process" in r.stderr
    finally:
        p.kill()
        p.wait()
    # the kernel released the dead trainer's lock: the run can be continued at once
    latest = Run.open(tmp_path / "r").latest.step
    r = trainer("--run-dir", tmp_path / "r", "--resume-from", "latest", "--stop-at-step", str(latest + 2),
                "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert Run.open(tmp_path / "r").latest.step == latest + 2


def test_async_save_writes_the_same_checkpoints(tmp_path, tiny_run):
    r = trainer("--run-dir", tmp_path / "a", "--epochs", "2", "--save-every", "10", "--keep-last", "10",
                "--async-save", "--stop-at-step", "23", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = trainer("--run-dir", tmp_path / "a", "--resume-from", "latest", "--async-save", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for c in load_manifest(tiny_run).checkpoints:
        for f in ("model.safetensors", "optimizer.pt", "scheduler.pt"):
            assert (tiny_run / "checkpoints" / c.name / f).read_bytes() == \
                (tmp_path / "a" / "checkpoints" / c.name / f).read_bytes(), (c.name, f)
        # the fixture trained inside pytest, whose own use of `random` differs: compare torch's RNG
        rng = [torch.load(d / "checkpoints" / c.name / "rng_state.pt", weights_only=True) for d in (tiny_run, tmp_path / "a")]
        assert torch.equal(rng[0]["torch"], rng[1]["torch"])
    assert verify_run(Run.open(tmp_path / "a")).problems == []

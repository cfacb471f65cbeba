"""A newcomer's first hour: one exit rule, a failed first run that cleans up, the whole loss
curve, the everyday commands (ls, diff, prune, pack --dry-run), the plan kept after a longer
resume, and help that says what every option does."""

import json
import os
import shutil
import signal
import subprocess
import time

import click
import pytest

from aptbundle.commands.cli import main as aptbundle_main
from aptbundle.format.manifest import load_manifest
from aptbundle.format.run import Run
from aptbundle.format.verify import verify_run
from conftest import APTBUNDLE, PY, TRAINER, cli, no_traceback, sh, trainer

GENERATE = [PY, "-m", "apt_model.generate"]


def _wait_for_checkpoint(run_dir, timeout=60):
    deadline = time.time() + timeout
    while not (Run.is_run(run_dir) and Run.open(run_dir).latest) and time.time() < deadline:
        time.sleep(0.05)


def test_exit_codes_follow_one_rule(tiny_run, tmp_path):
    from click.testing import CliRunner

    from apt_model.generate import main as generate
    from apt_model.training.trainer import main as trainer

    empty = tmp_path / "empty.aptrun.tar.zst"
    empty.write_bytes(b"")
    table = [  # (program, arguments, expected status); run as typed, in this process
        (aptbundle_main, ["verify", tmp_path / "missing"], 1),
        (aptbundle_main, ["unpack", empty, "-C", tmp_path / "d"], 1),
        (aptbundle_main, ["pack", tiny_run, "--level", "99"], 2),
        (aptbundle_main, ["prune", tiny_run], 2),  # --keep-last is required
        (aptbundle_main, ["unpack", empty, "--expect-digest"], 2),
        (aptbundle_main, ["unpack", empty, "--expect-digest", ""], 2),  # an unset $D never skips the check
        (aptbundle_main, ["verify", tiny_run, "-q"], 0),
        (trainer, ["--run-dir", tmp_path / "new", "--epochs", "0"], 2),
        (trainer, ["--run-dir", tmp_path / "new", "--stop-at-step", "0"], 2),
        (trainer, ["--run-dir", tmp_path / "new", "--lr", "-1"], 2),
        (trainer, ["--run-dir", tmp_path / "new", "--model-size", "huge"], 2),
        (trainer, ["--run-dir", tiny_run, "--epochs", "1"], 1),  # already a run: say how to continue it
        (generate, [tiny_run, "--max-new-tokens", "-1"], 2),
        (generate, [tiny_run, "--temperature", "0"], 2),
        (generate, [tmp_path / "missing"], 1),
        (generate, [tiny_run, "--max-new-tokens", "5", "-q"], 0),
    ]
    for program, args, want in table:
        r = CliRunner().invoke(program, [str(a) for a in args])
        assert r.exit_code == want, (args, r.exit_code, r.output)
        assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.exception)
    assert not (tmp_path / "new").exists() and not (tmp_path / "d").exists()  # refused before creating


def test_ctrl_c_saves_and_exits_130(tmp_path):  # SIGTERM (143): test_trainer
    sig, status = signal.SIGINT, 130
    run_dir = tmp_path / "r"
    p = subprocess.Popen([*TRAINER, "--run-dir", str(run_dir), "--epochs", "50", "-q"], cwd=tmp_path,
                         stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(run_dir)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == status, err
    run = Run.open(run_dir)
    state = json.loads((run.checkpoint_dir(run.latest.name) / "trainer_state.json").read_text())
    assert state["global_step"] == run.latest.step > 28  # saved where it stopped, not at the epoch end
    assert verify_run(run).ok


def test_sigterm_during_pack_cleans_up_and_exits_143(tmp_path):
    run = Run.create(tmp_path / "big", trainer=None)
    run.write_file("blob.dat", os.urandom(1 << 20) * 300)
    run.save_manifest()
    out = tmp_path / "big.aptrun.tar.zst"
    p = subprocess.Popen([*APTBUNDLE, "pack", str(run.path), "-o", str(out), "-q"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not any(x.name.startswith(".aptrun-tmp-") for x in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and "stopped by SIGTERM" in err and no_traceback(err), err
    leftovers = [x.name for x in list(tmp_path.iterdir()) + list(run.path.iterdir()) if x.name.startswith(".aptrun-tmp")]
    assert leftovers == [] and not out.exists()


def test_a_first_run_that_fails_leaves_nothing_and_a_killed_one_restarts_with_resume(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = trainer("--run-dir", tmp_path / "r", "--data", empty, cwd=tmp_path)
    assert r.returncode == 1 and "too short" in r.stderr and no_traceback(r.stderr)
    assert not (tmp_path / "r").exists()
    # a first run killed before its first checkpoint: `aptbundle resume` trains it from the start
    from apt_model.config import preset
    from apt_model.training.setup import new_run

    new_run(tmp_path / "k", preset("tiny", epochs=1), None)
    assert Run.open(tmp_path / "k").latest is None
    r = cli("resume", tmp_path / "k", "-q")
    assert r.exit_code == 0, r.output
    assert Run.open(tmp_path / "k").latest.step == 28


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A ~300-step tiny run whose best checkpoint is chosen by validation loss."""
    base = tmp_path_factory.mktemp("long")
    r = sh(*TRAINER, "--run-dir", base / "run", "--epochs", "11", "--keep-last", "2", "--best-metric", "val_loss",
           "--eval-every", "14", "-q", cwd=base, timeout=600)
    assert r.returncode == 0, r.stderr
    return base / "run"


def test_inspect_draws_the_whole_loss_curve_with_validation(long_run, tmp_path):
    lines = [json.loads(x) for x in (long_run / "logs/metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "loss" in x]
    val = [x for x in lines if "val_loss" in x]
    assert len(train) == 308 and len(val) == 22  # every step, and every 14 steps
    r = cli("inspect", long_run)
    assert r.exit_code == 0, r.output
    assert "step 1" in r.stdout and "step 308" in r.stdout
    assert f"loss {train[0]['loss']:.4f} -> {train[-1]['loss']:.4f}" in r.stdout  # from the first step, not a checkpoint
    assert f"val_loss {val[0]['val_loss']:.4f} -> {val[-1]['val_loss']:.4f}" in r.stdout
    assert sum(line.count("┤") for line in r.stdout.splitlines()) >= 10  # a chart, not a sparkline
    info = json.loads(cli("inspect", long_run, "--json").stdout)
    assert info["curves"]["loss"][0] == [1, train[0]["loss"]] and len(info["curves"]["loss"]) == 308
    # an archive carries the curve in its manifest: the same chart from the first member alone
    out = tmp_path / "run.aptrun.tar.zst"
    assert cli("pack", long_run, "-o", out, "-q").exit_code == 0
    r = cli("inspect", out)
    assert r.exit_code == 0 and "step 308" in r.stdout and f"loss {train[0]['loss']:.4f}" in r.stdout
    for name in ("loss.png", "loss.svg"):
        r = cli("inspect", long_run, "--plot", tmp_path / name)
        assert r.exit_code == 0, r.output
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "loss.svg").read_bytes()[:1000]
    r = cli("inspect", long_run, "--plot", tmp_path / "loss.gif")
    assert r.exit_code == 1 and ".png or .svg" in r.stderr


def test_best_is_chosen_by_the_metric_asked_for(long_run):
    man = load_manifest(long_run)
    assert man.best.metric == "val_loss" and man.best.mode == "min"
    kept = {c.name: c.metrics["val_loss"] for c in man.checkpoints}
    assert man.best.name == min(kept, key=kept.get)
    assert json.loads((long_run / "config.json").read_text())["best_metric"] == "val_loss"


def test_ls_diff_prune_and_dry_run(tiny_run, long_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "runs" / "a")
    shutil.copytree(long_run, tmp_path / "runs" / "nested" / "b")
    assert cli("pack", tmp_path / "runs" / "a", "-o", tmp_path / "runs", "-q").exit_code == 0
    r = cli("ls", tmp_path / "runs", "--json")
    runs = {(x["name"], x["kind"]): x for x in json.loads(r.stdout)["runs"]}
    assert set(runs) == {("run1", "run"), ("run1", "archive"), ("run", "run")}  # a run keeps its name
    assert runs[("run1", "run")]["digest"] == runs[("run1", "archive")]["digest"] == load_manifest(tiny_run).digest()
    assert runs[("run", "run")]["steps"] == 308
    assert "steps" in cli("ls", tmp_path / "runs").stdout

    r = cli("diff", tiny_run, tmp_path / "runs" / "run1.aptrun.tar.zst", "--json")
    assert json.loads(r.stdout)["same"] is True
    d = json.loads(cli("diff", tiny_run, long_run, "--json").stdout)
    assert d["config"]["epochs"] == [2, 11] and d["config"]["best_metric"] == ["loss", "val_loss"]
    assert d["final"]["b"]["step"] == 308 and "logs/metrics.jsonl" in d["files"]["changed"]
    assert "epochs: 2 -> 11" in cli("diff", tiny_run, long_run).stdout

    r = cli("pack", tmp_path / "runs" / "a", "--dry-run", "--json", "-o", tmp_path / "x.aptrun.tar.zst")
    plan = json.loads(r.stdout)
    assert plan["data_size"] == load_manifest(tiny_run).total_size() and not (tmp_path / "x.aptrun.tar.zst").exists()
    assert {f["path"] for f in plan["files"]} == {f.path for f in load_manifest(tiny_run).files}

    a = tmp_path / "runs" / "a"
    before = load_manifest(a)
    r = cli("prune", a, "--keep-last", "1", "--dry-run")
    assert r.exit_code == 0 and load_manifest(a) == before
    r = cli("prune", a, "--keep-last", "1", "--json")
    gone = json.loads(r.stdout)["pruned"]
    man = load_manifest(a)
    assert gone and {c.name for c in man.checkpoints} == {man.latest, man.best.name}
    assert all(not (a / "checkpoints" / g).exists() for g in gone) and verify_run(Run.open(a)).ok


def test_the_plan_is_kept_after_a_longer_resume_and_inspect_says_how_the_digest_moved(run_copy):
    d0 = load_manifest(run_copy).digest()
    r = cli("resume", run_copy, "--epochs", "3", "-q")
    assert r.exit_code == 0 and "finished at step 84" in r.stdout, r.output
    d1 = load_manifest(run_copy).digest()
    r = cli("resume", run_copy, "-q")  # a plain resume keeps the 3-epoch plan: nothing left to do
    assert r.exit_code == 0 and "finished at step 84" in r.stdout, r.output
    assert load_manifest(run_copy).history[-1]["planned_epochs"] == 3
    r = cli("inspect", run_copy)
    assert f"digest {d0[:12]} -> {d1[:12]}" in r.stdout


def test_every_option_says_what_it_does_and_the_command_list_is_whole():
    from apt_model.generate import main as generate_main
    from apt_model.training.trainer import main as trainer_main

    commands = [trainer_main, generate_main, *aptbundle_main.commands.values()]
    for cmd in commands:
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name != "help":
                assert p.help, f"{cmd.name} {p.opts} has no help"
    r = cli("--help")
    listing = r.stdout.split("Commands:")[1]
    assert r.exit_code == 0 and "..." not in listing  # no summary cut mid-sentence
    for name, cmd in aptbundle_main.commands.items():
        assert f"{name} " in listing and cmd.get_short_help_str(limit=200) in listing


def test_messages_name_the_users_paths(tmp_path, tiny_run):
    r = cli("inspect", tmp_path / "nothere")
    assert r.exit_code == 1 and "no such file or folder" in r.stderr
    (tmp_path / "e.aptrun.tar.zst").write_bytes(b"")
    r = cli("inspect", tmp_path / "e.aptrun.tar.zst")
    assert r.exit_code == 1 and "empty file" in r.stderr
    r = cli("verify", tmp_path / "nothere")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1  # one line, said once
    r = sh(*GENERATE, tiny_run, "--max-new-tokens", "10", "--device", "cpu")
    assert r.returncode == 0 and "best checkpoint" in r.stderr and "on cpu" in r.stderr
    r = trainer("--run-dir", tmp_path / "t", "--epochs", "1", cwd=tmp_path)
    assert r.returncode == 0 and f"next: aptbundle pack {tmp_path / 't'}" in r.stderr
    assert load_manifest(tmp_path / "t").digest() in r.stderr and ".aptrun-tmp" not in r.stderr

"""The shape the next features build on: one reader that writes nothing, one verifier under a
shared lock, temporaries that never match another run's, a checkpointer that owns its folders,
a trainer that writes only into its run, and layers that lint-imports keeps honest."""

import json
import os
import resource
import shutil
import subprocess
import time

import torch

from aptbundle.state.checkpoint import Checkpointer
from aptbundle.layouts.adopt import adopt
from aptbundle.format.manifest import load_manifest
from aptbundle.format.run import Run
from aptbundle.format.verify import verify_run
from conftest import APTBUNDLE, PY, ROOT, TRAINER, cli, no_traceback, sh


def _limited(limit: int):
    def pre():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # no file may grow past it

    return pre


def test_verify_archive_writes_nothing_and_needs_no_temp_space(tmp_path):
    run = Run.create(tmp_path / "big", trainer=None)
    # a 600 MB torch.save file: the kind of member the scan must read as it streams
    torch.save({"state": {0: {"exp_avg": torch.zeros(150_000_000)}}, "param_groups": [{"lr": 0.1}]},
               run.path / "optimizer.pt")
    run.record_file("optimizer.pt")
    run.save_manifest()
    out = tmp_path / "big.aptrun.tar.zst"
    assert cli("pack", run.path, "-o", out, "-q").exit_code == 0
    shutil.rmtree(run.path)
    small_tmp = tmp_path / "tmp"
    small_tmp.mkdir()
    before = sorted(os.listdir(tmp_path))
    env = dict(os.environ, TMPDIR=str(small_tmp), TEMP=str(small_tmp), TMP=str(small_tmp))
    # a small launcher reports the verify's own peak memory (a fork of this big process would not)
    launcher = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]);"
                " print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr);"
                " sys.exit(r.returncode)")
    r = subprocess.run([PY, "-c", launcher, *APTBUNDLE, "verify", str(out)], env=env, cwd=small_tmp,
                       capture_output=True, text=True, preexec_fn=_limited(1 << 20))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok:") and no_traceback(r.stderr)
    assert os.listdir(small_tmp) == [] and sorted(os.listdir(tmp_path)) == before  # nothing written
    peak_kb = int(r.stderr.strip().splitlines()[-1])
    assert peak_kb * 1024 < 100e6, f"peak RSS {peak_kb / 1024:.0f} MB"


def test_verify_and_resume_while_a_trainer_commits_never_see_a_half_commit(tmp_path):
    run_dir = tmp_path / "r"
    p = subprocess.Popen([*TRAINER, "--run-dir", str(run_dir), "--epochs", "40", "--save-every", "2",
                          "--keep-last", "1", "-q"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (Run.is_run(run_dir) and Run.open(run_dir).latest) and time.time() < deadline:
            time.sleep(0.05)
        seen = set()
        deadline = time.time() + 60
        while (len(seen) < 4) and time.time() < deadline:
            r = cli("verify", run_dir, "--json", "-q")
            report = json.loads(r.stdout)
            assert r.exit_code == 0 and report["ok"], report["problems"]
            seen.add(load_manifest(run_dir).latest)
            r = cli("resume", run_dir, "-q")
            assert r.exit_code == 1 and "being written by process" in r.stderr, r.stderr
            assert "failed verification" not in r.stderr and no_traceback(r.output)
        assert len(seen) >= 4, "the trainer should have committed several checkpoints meanwhile"
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


def _big_archive(tmp_path, name: str, mb: int) -> str:
    run = Run.create(tmp_path / "src" / name, trainer=None)
    run.write_file("blob.dat", os.urandom(1 << 20) * mb)
    run.save_manifest()
    out = tmp_path / f"{name}.aptrun.tar.zst"
    assert cli("pack", run.path, "-o", out, "--level", "1", "-q").exit_code == 0
    return str(out)


def test_cleaning_up_after_exp_never_touches_a_live_unpack_of_exp_31337(tmp_path):
    slow = _big_archive(tmp_path, "exp-31337", 300)
    quick = _big_archive(tmp_path, "exp", 1)
    dest = tmp_path / "dest"
    dest.mkdir()
    p = subprocess.Popen([*APTBUNDLE, "unpack", slow, "-C", str(dest), "-q"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(x.name.endswith("-exp-31337") for x in dest.iterdir()) and time.time() < deadline:
        time.sleep(0.01)
    assert p.poll() is None, "the slow unpack should still be running"
    # a dead process's leftovers for run exp, named as aptbundle names them
    dead = subprocess.Popen([PY, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE, text=True)
    dead_pid = int(dead.communicate()[0])
    (dest / f".aptrun-tmp-{dead_pid}-0a0b0c0d-exp").mkdir()
    r = sh(*APTBUNDLE, "unpack", quick, "-C", dest, "-q")
    assert r.returncode == 0, r.stderr
    assert not (dest / f".aptrun-tmp-{dead_pid}-0a0b0c0d-exp").exists()  # the stale one went
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err  # the live one was left alone and completed
    assert sorted(os.listdir(dest)) == ["exp", "exp-31337"]
    assert verify_run(Run.open(dest / "exp-31337")).ok


def test_retiring_an_adopted_checkpoint_removes_its_files_from_the_manifest(tmp_path):
    hf = tmp_path / "hf"
    for step in (10, 20):
        d = hf / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"epoch": step / 10, "log_history": [{"loss": 3.0}]}))
        (d / "notes.txt").write_text(f"step {step}")
    (hf / "config.json").write_text("{}")
    run = adopt(hf, trainer="t")
    assert [c.name for c in run.checkpoints] == ["checkpoint-10", "checkpoint-20"]
    model = torch.nn.Linear(4, 4)
    ckpt = Checkpointer(run, model=model, keep_last=1)
    with run.writer():
        ckpt.save(step=30, epoch=3, metrics={"loss": 1.0})
    man = load_manifest(hf)
    assert [c.name for c in man.checkpoints] == ["step-00000030"]
    assert not any(f.path.startswith(("checkpoint-10/", "checkpoint-20/")) for f in man.files)
    assert not (hf / "checkpoint-10").exists() and not (hf / "checkpoint-20").exists()
    assert verify_run(Run.open(hf)).problems == []


def test_trainer_in_a_read_only_working_directory_writes_only_into_its_run(tmp_path):
    cwd = tmp_path / "readonly"
    cwd.mkdir()
    locked = subprocess.run(["chattr", "+i", str(cwd)], capture_output=True).returncode == 0
    if not locked:  # no immutable flag on this file system: a read-only mode (root ignores it, though)
        cwd.chmod(0o555)
    try:
        r = sh(*TRAINER, "--run-dir", tmp_path / "run", "--epochs", "1", "--stop-at-step", "4", "-q", cwd=cwd)
        assert r.returncode == 0, r.stderr
        assert os.listdir(cwd) == []
        assert Run.open(tmp_path / "run").latest.step == 4
        assert verify_run(Run.open(tmp_path / "run")).ok
    finally:
        subprocess.run(["chattr", "-i", str(cwd)], capture_output=True)
        cwd.chmod(0o755)


def test_layers_are_kept_and_no_module_imports_itself_in_a_circle():
    r = sh("lint-imports", cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout
    import grimp  # import-linter's own graph

    graph = grimp.build_graph("aptbundle", "apt_model")
    cycles = [(a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
              if a != b and b in graph.modules and graph.chain_exists(importer=b, imported=a)]
    assert cycles == []


def test_no_module_is_longer_than_about_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in list((ROOT / "aptbundle").rglob("*.py")) +
            list((ROOT / "apt_model").rglob("*.py")) if (n := len(p.read_text().splitlines())) > 440}
    assert long == {}

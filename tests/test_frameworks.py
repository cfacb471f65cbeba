"""Real training outputs of other frameworks: adopt, move, resume (Hugging Face Trainer,
accelerate, Lightning, torch.distributed.checkpoint, save_pretrained), with the real libraries."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

import frameworks as fw
from aptbundle.format.manifest import load_manifest
from conftest import cli, no_traceback

transformers = pytest.importorskip("transformers")


def init(path: Path, *more: str) -> tuple[dict, str]:
    r = cli("init", path, "--json", "-q", *more)
    assert r.exit_code == 0, r.output + r.stderr
    return json.loads(r.stdout), r.stderr


def move(run: Path, tmp: Path, *pack_args: str) -> Path:
    """Pack, verify the archive, unpack under another HOME and working directory, verify there."""
    arc = tmp / f"{run.name}.aptrun.tar.zst"
    r = cli("pack", run, "-o", arc, "--force", "-q", *pack_args)
    assert r.exit_code == 0, r.output + r.stderr
    assert cli("verify", arc, "-q").exit_code == 0
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    home = os.environ.get("HOME")
    os.environ["HOME"] = str(elsewhere)
    try:
        r = cli("unpack", arc, "-q", cwd=elsewhere)
        assert r.exit_code == 0, r.output + r.stderr
    finally:
        if home is not None:
            os.environ["HOME"] = home
    moved = elsewhere / run.name
    assert cli("verify", moved, "-q").exit_code == 0
    return moved


def test_hugging_face_trainer_output_adopts_moves_and_resumes_bit_exactly(tmp_path):
    ref = tmp_path / "hf_out"
    fw.hf_trainer(ref)
    info, err = init(ref)
    assert info["layout"] == "hf-trainer"
    assert [(c["name"], c["step"]) for c in info["checkpoint_info"]] == [
        ("checkpoint-10", 10), ("checkpoint-20", 20), ("checkpoint-30", 30), ("checkpoint-40", 40)]
    assert all(isinstance(c["metrics"].get("loss"), float) for c in info["checkpoint_info"])
    state = json.loads((ref / "checkpoint-40" / "trainer_state.json").read_text())
    assert info["best"] == state["best_model_checkpoint"].rsplit("/", 1)[-1]
    assert "training_args.bin" in info["untrusted"] and "checkpoint-20/training_args.bin" in info["untrusted"]
    lines = err.splitlines()
    assert len([x for x in lines if "training_args.bin" in x]) == 1  # named in one line
    assert any("checkpoint-40/trainer_state.json records absolute paths" in x and str(ref) in x for x in lines)
    r = cli("inspect", ref)
    assert "Hugging Face Trainer" in r.stdout and "never loaded" in r.stdout and "loss" in r.stdout
    best = json.loads(cli("inspect", ref, "--json").stdout)["best"]  # the rule, read from training_args.bin's strings
    assert (best["metric"], best["mode"]) == ("eval_loss", "min") and best["value"] == state["best_metric"]
    r = cli("verify", ref, "--strict")
    assert r.exit_code == 1 and "training_args.bin" in r.stderr and no_traceback(r.stderr)

    moved = move(ref, tmp_path)
    r = cli("resume", moved, "--from", "checkpoint-20")
    assert r.exit_code == 3 and f'trainer.train(resume_from_checkpoint="{moved}/checkpoint-20")' in r.stdout
    resumed = tmp_path / "resumed"
    fw.hf_trainer(resumed, resume=moved / "checkpoint-20")
    assert (resumed / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


def test_init_update_follows_a_folder_the_trainer_keeps_writing(tmp_path):
    out = tmp_path / "hf_out"
    fw.hf_trainer(out, steps=20, save_total_limit=3)
    init(out)
    fw.hf_trainer(out, steps=40, save_total_limit=3, resume=out / "checkpoint-20")  # writes 30, 40; deletes 10
    on_disk = sorted(p.name for p in out.glob("checkpoint-*"))
    assert len(on_disk) == 3 and "checkpoint-40" in on_disk
    r = cli("pack", out, "-o", tmp_path / "x.aptrun.tar.zst")  # new checkpoints, a deleted one, a new final model
    assert r.exit_code == 1 and f"aptbundle init --update {out}" in r.stderr and no_traceback(r.stderr)
    r = cli("init", out, "--update")
    assert r.exit_code == 0, r.stderr
    assert "+ checkpoint-40/model.safetensors" in r.stdout and "- checkpoint-10/model.safetensors" in r.stdout
    man = load_manifest(out)
    assert sorted(c.name for c in man.checkpoints) == on_disk and man.latest == "checkpoint-40"
    assert cli("pack", out, "-o", tmp_path / "x.aptrun.tar.zst", "-q").exit_code == 0
    r = cli("init", out, "--update")
    assert r.exit_code == 0 and "nothing changed" in r.stdout


def test_accelerate_save_state_adopts_moves_and_resumes_bit_exactly(tmp_path):
    pytest.importorskip("accelerate")
    ref = tmp_path / "acc_out"
    fw.accelerate_loop(ref)
    info, _ = init(ref)
    assert info["layout"] == "accelerate"
    assert info["checkpoints"] == [f"checkpoint_{i}" for i in range(4)]
    moved = move(ref, tmp_path)
    r = cli("resume", moved, "--from", "checkpoint_1")
    assert r.exit_code == 3 and f'accelerator.load_state("{moved}/checkpoints/checkpoint_1")' in r.stdout
    resumed = tmp_path / "resumed"
    fw.accelerate_loop(resumed, resume=moved / "checkpoints/checkpoint_1")
    assert (resumed / "final/model.safetensors").read_bytes() == (ref / "final/model.safetensors").read_bytes()


def test_lightning_checkpoints_are_listed_and_last_ckpt_link_travels(tmp_path):
    pytest.importorskip("lightning")
    ref = tmp_path / "pl_out"
    fw.lightning_fit(ref)
    assert (ref / "checkpoints/last.ckpt").is_symlink()
    info, err = init(ref)
    assert info["layout"] == "lightning" and info["links"] == ["checkpoints/last.ckpt"]
    assert [c["step"] for c in info["checkpoint_info"]] == [10, 20, 30, 40]
    assert "records absolute paths" in err  # ModelCheckpoint's dirpath, found statically
    assert err.count("records absolute paths") == 1 and "last.ckpt stays at step 40" in err  # once a run
    latest = moved = move(ref, tmp_path, "--checkpoints", "latest")
    link = moved / "checkpoints/last.ckpt"
    assert link.is_symlink() and os.readlink(link) == "epoch=4-step=40.ckpt" and link.resolve().is_file()
    assert [c.step for c in load_manifest(latest).checkpoints] == [40]
    r = cli("resume", moved)
    assert r.exit_code == 3 and "trainer.fit(model, ckpt_path=" in r.stdout
    trainer, _ = fw.lightning_fit(tmp_path / "more", ckpt_path=link, steps=50)
    assert trainer.global_step == 50
    r = cli("prune", ref, "--keep-last", "1")  # single-file checkpoints are pruned like folders
    assert r.exit_code == 0 and not (ref / "checkpoints/epoch=1-step=10.ckpt").exists()
    assert cli("verify", ref, "-q").exit_code == 0


def test_a_link_out_of_the_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "a.dat").write_bytes(b"x" * 10)
    os.symlink("/etc/passwd", run / "out.ckpt")
    r = cli("init", run)
    assert r.exit_code == 1 and "out.ckpt" in r.stderr and "symbolic link" in r.stderr
    (run / "out.ckpt").unlink()
    os.symlink("a.dat", run / "alias.dat")
    assert cli("init", run, "-q").exit_code == 0
    (run / "alias.dat").unlink()
    os.symlink("../../etc/passwd", run / "alias.dat")  # the recorded link now points elsewhere
    r = cli("verify", run)
    assert r.exit_code == 1 and "alias.dat" in r.stderr


@pytest.mark.parametrize("nested", [True, False])
def test_a_default_dcp_save_adopts_moves_and_loads(tmp_path, nested):
    run = tmp_path / "dcp_out"
    saved = fw.dcp_save(run / "step-10" if nested else run)
    info, _ = init(run)
    assert info["layout"] == "dcp" and info["checkpoints"] == (["step-10"] if nested else [])
    meta = run / ("step-10/.metadata" if nested else ".metadata")
    assert b"PosixPath" in meta.read_bytes()  # the path a default dcp.save records: allowed, scanned
    moved = move(run, tmp_path)
    loaded = fw.dcp_load(moved / "step-10" if nested else moved)
    assert all((loaded[k] == v).all() for k, v in saved.items())


def test_a_save_pretrained_folder_verifies_as_an_archive_and_keeps_its_modes(tmp_path):
    import torch

    run = tmp_path / "tiny_gpt"
    model = fw.save_pretrained(run)
    os.chmod(run / "config.json", 0o600)
    os.chmod(run / "generation_config.json", 0o644)
    info, _ = init(run)
    assert info["layout"] == "save-pretrained"
    moved = move(run, tmp_path)  # verify ARCHIVE with a scannable file at the top of the run
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        assert stat.S_IMODE(os.stat(moved / f).st_mode) == stat.S_IMODE(os.stat(run / f).st_mode), f
    assert stat.S_IMODE(os.stat(moved / "config.json").st_mode) == 0o600
    from transformers import GPT2LMHeadModel

    again = GPT2LMHeadModel.from_pretrained(str(moved)).eval()
    model.eval()
    ids = torch.arange(16).unsqueeze(0) % 64
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    r = cli("resume", moved)
    assert r.exit_code == 3 and "from_pretrained" in r.stdout


def test_aptignore_keeps_files_from_travelling(tmp_path):
    run = tmp_path / "out"
    (run / "runs").mkdir(parents=True)
    (run / "weights.dat").write_bytes(b"w" * 100)
    (run / "runs/events.out.tfevents.1").write_bytes(b"e")
    (run / ".DS_Store").write_bytes(b"d")
    (run / "notes.txt~").write_text("backup")
    (run / ".aptignore").write_text("runs/\n")
    info, _ = init(run)
    assert sorted(f.path for f in load_manifest(run).files) == [".aptignore", "weights.dat"]
    (run / "runs/events.out.tfevents.2").write_bytes(b"e")  # TensorBoard keeps writing: no matter
    assert cli("verify", run, "-q").exit_code == 0
    assert cli("pack", run, "-o", tmp_path / "o.aptrun.tar.zst", "-q").exit_code == 0


def test_a_manifest_cannot_make_a_file_untrusted_to_skip_its_scan(tmp_path):
    """``untrusted`` in a manifest is a record, not a pass: the policy comes from the file's name."""
    import pickle

    run = tmp_path / "run"
    run.mkdir()

    class Boom:
        def __reduce__(self):
            return (os.system, ("true",))

    (run / "optimizer.pt").write_bytes(pickle.dumps(Boom(), protocol=2))
    (run / "ok.txt").write_text("x")
    r = cli("init", run)
    assert r.exit_code == 1 and "optimizer.pt" in r.stderr
    (run / "optimizer.pt").unlink()
    init(run)
    (run / "optimizer.pt").write_bytes(pickle.dumps(Boom(), protocol=2))
    r = cli("init", run, "--update")
    assert r.exit_code == 1 and "optimizer.pt" in r.stderr and no_traceback(r.stderr)
    raw = json.loads((run / "aptrun.json").read_text())
    import hashlib

    data = (run / "optimizer.pt").read_bytes()
    raw["files"].append({"path": "optimizer.pt", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    raw["files"].sort(key=lambda f: f["path"])
    raw["untrusted"] = ["optimizer.pt"]
    (run / "aptrun.json").write_text(json.dumps(raw))
    r = cli("verify", run)
    assert r.exit_code == 1 and "optimizer.pt" in r.stderr and "system" in r.stderr
    shutil.rmtree(run)


@pytest.mark.parametrize("links", [
    [{"path": "x", "target": "../../etc/passwd"}],
    [{"path": "x", "target": "/etc/passwd"}],
    [{"path": "a.dat", "target": "a.dat"}],  # a link over a listed file
    [{"path": "x", "target": "y"}, {"path": "y", "target": "a.dat"}],  # a link to a link
    [{"path": "../x", "target": "a.dat"}],
    [{"path": "a.dat/x", "target": "../a.dat"}],  # a link inside a listed file
    [{"path": ".aptrun.lock", "target": "a.dat"}],  # one of aptbundle's own names
    "not a list",
])
def test_a_hostile_link_in_a_manifest_is_refused_before_anything_is_written(tmp_path, links):
    from archive_builder import manifest, member, tar, zst

    files = {"a.dat": b"data"}
    raw = manifest("run1", files, links=links)
    arc = tmp_path / "evil.aptrun.tar.zst"
    arc.write_bytes(zst(tar(member("run1/aptrun.json", raw), member("run1/a.dat", files["a.dat"]))))
    r = cli("unpack", arc, "-C", tmp_path / "dest")
    assert r.exit_code == 1 and no_traceback(r.output + r.stderr) and not (tmp_path / "dest").exists()
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()


# -- foreign runs, told truthfully -----------------------------------------------------------------
def test_weights_only_checkpoints_are_reported_not_resumable_and_resume_asks_first(tmp_path):
    ref = tmp_path / "hf_weights"
    fw.hf_trainer(ref, steps=20, save_only_model=True)
    info, _ = init(ref)
    ck = {c["name"]: c for c in info["checkpoint_info"]}
    assert ck["checkpoint-20"]["resumable"] is False
    assert set(ck["checkpoint-20"]["missing"]) == {"optimizer", "scheduler", "rng"}
    shown = json.loads(cli("inspect", ref, "--json").stdout)
    latest = next(c for c in shown["checkpoints"] if c["name"] == "checkpoint-20")
    assert latest["resumable"] is False and "optimizer" in latest["missing"]
    assert "weights only" in cli("inspect", ref).stdout
    r = cli("resume", ref)
    assert r.exit_code == 1 and "weights only" in r.stderr and "--weights-only" in r.stderr, r.output
    r = cli("resume", ref, "--weights-only")
    assert r.exit_code == 3 and "resume_from_checkpoint" in r.stdout and not r.stderr.startswith("error"), r.output


def test_a_lightning_weights_only_checkpoint_is_not_resumable(tmp_path):
    pytest.importorskip("lightning")
    ref = tmp_path / "pl_weights"
    fw.lightning_fit(ref, steps=20, weights_only=True)
    info, err = init(ref)
    assert all(c["resumable"] is False and "optimizer" in c["missing"] for c in info["checkpoint_info"]), info
    r = cli("resume", ref)
    assert r.exit_code == 1 and "weights only" in r.stderr and no_traceback(r.output), r.output


def test_a_folder_that_moved_on_is_never_called_verified(tmp_path):
    ref = tmp_path / "hf_out"
    fw.hf_trainer(ref, steps=20)
    init(ref)
    moved = move(ref, tmp_path)
    fw.hf_trainer(moved, steps=40, resume=moved / "checkpoint-20")  # the Trainer trains on in the moved folder
    r = cli("resume", moved)
    assert r.exit_code == 1 and no_traceback(r.output), r.output
    assert "checkpoint-30" in r.stderr and "checkpoint-40" in r.stderr and "init --update" in r.stderr
    r = cli("verify", moved)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.exit_code == 1 and any("checkpoint-30" in x for x in errors) and any("checkpoint-40" in x for x in errors)
    assert len([x for x in errors if "checkpoint-30" in x]) == 1, errors  # one line per checkpoint folder
    info = json.loads(cli("inspect", moved, "--json").stdout)
    assert set(info["unlisted_checkpoints"]) >= {"checkpoint-30", "checkpoint-40"}
    r = cli("init", moved)  # init again is init --update
    assert r.exit_code == 0, r.output
    r = cli("resume", moved)
    assert r.exit_code == 3 and "checkpoint-40" in r.stdout, r.output


def test_accelerate_steps_come_from_the_saved_state(tmp_path):
    out = tmp_path / "acc"
    fw.accelerate_steps(out, steps=20, every=10)
    info, _ = init(out)
    assert [c["step"] for c in info["checkpoint_info"]] == [10, 20], info["checkpoint_info"]
    r = cli("resume", out)
    assert r.exit_code == 3 and "project_configuration.iteration = 2" in r.stdout, r.output


def test_init_twice_on_a_folder_that_grew_equals_init_update(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    fw.hf_trainer(a, steps=20)
    init(a)
    shutil.copytree(a, b)
    for d in (a, b):
        fw.hf_trainer(d, steps=30, resume=d / "checkpoint-20")
    assert cli("init", a, "-q").exit_code == 0
    assert cli("init", b, "--update", "-q").exit_code == 0
    ma, mb = load_manifest(a), load_manifest(b)
    assert [c.name for c in ma.checkpoints] == [c.name for c in mb.checkpoints] == \
        ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert {f.path: f.size for f in ma.files}.keys() == {f.path: f.size for f in mb.files}.keys()
    fresh = tmp_path / "fresh"
    fw.hf_trainer(fresh, steps=10)
    assert cli("init", fresh, "--update", "-q").exit_code == 0  # --update on a folder without a manifest adopts it


def _fixture(name: str, tmp_path: Path) -> Path:
    """A copy of a folder that a framework not installable here wrote (tests/fixtures/make_*.py)."""
    from conftest import FIXTURES

    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst, symlinks=True)
    return dst


def test_a_composer_run_is_adopted_with_its_checkpoints_moved_and_resumable(tmp_path):
    ref = _fixture("composer_run", tmp_path)
    info, err = init(ref)
    assert info["layout"] == "composer" and info["links"] == ["latest-rank0.pt"]
    ck = {c["name"]: c for c in info["checkpoint_info"]}
    assert (ck["ep0-ba10"]["step"], ck["ep0-ba10"]["epoch"]) == (10, 0)
    assert (ck["ep1-ba20"]["step"], ck["ep1-ba20"]["epoch"]) == (20, 1) and ck["ep1-ba20"]["resumable"]
    assert info["latest"] == "ep1-ba20" and no_traceback(err)
    moved = move(ref, tmp_path)
    assert os.readlink(moved / "latest-rank0.pt") == "ep1-ba20-rank0.pt"
    r = cli("resume", moved)
    assert r.exit_code == 3 and f'load_path="{moved}/ep1-ba20-rank0.pt"' in r.stdout, r.output


def test_composer_checkpoints_allow_exactly_the_classes_composer_writes(tmp_path):
    import io
    import pickle
    import zipfile

    ref = _fixture("composer_run", tmp_path)
    init(ref)
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as z:  # a timedelta is fine; os.system is not
        z.writestr("archive/data.pkl", b"\x80\x02cdatetime\ntimedelta\nK\x01\x85Rcos\nsystem\n(S'true'\ntR\x86.")
    (ref / "ep1-ba20-rank0.pt").write_bytes(evil.getvalue())
    r = cli("init", ref)
    assert r.exit_code == 1 and "os.system" in r.stderr and no_traceback(r.output), r.output
    (ref / "notes.pt").write_bytes(pickle.dumps({"t": __import__("datetime").timedelta(1)}, protocol=2))
    (ref / "ep1-ba20-rank0.pt").unlink()
    (ref / "latest-rank0.pt").unlink()
    r = cli("init", ref)  # a timedelta outside Composer's own checkpoints: the default policy
    assert r.exit_code == 1 and "datetime.timedelta" in r.stderr, r.output


def test_a_ray_train_run_is_adopted_with_its_checkpoints_and_moved(tmp_path):
    ref = _fixture("ray_run", tmp_path)
    info, err = init(ref)
    assert info["layout"] == "ray-train" and no_traceback(err)
    assert [c["step"] for c in info["checkpoint_info"]] == [10, 20]
    assert all("loss" in c["metrics"] for c in info["checkpoint_info"])
    moved = move(ref, tmp_path)
    r = cli("resume", moved)
    assert r.exit_code == 3 and f'storage_path="{moved.parent}", name="{moved.name}"' in r.stdout, r.output

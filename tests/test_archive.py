"""pack / unpack / verify / inspect of real runs, through the CLI."""

import json
import os
import stat
import subprocess

import pytest

from aptbundle.archive import pack, read_archive_manifest, unpack
from aptbundle.format.manifest import load_manifest
from aptbundle.format.run import Run
from aptbundle.format.verify import verify_run
from conftest import APTBUNDLE, cli, no_traceback, sh


def tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_pack_unpack_round_trip_byte_identical(tiny_run, tmp_path):
    out = tmp_path / "run1.aptrun.tar.zst"
    r = cli("pack", tiny_run, "-o", out)
    assert r.exit_code == 0, r.output
    digest = load_manifest(tiny_run).digest()
    assert str(out) in r.stdout and digest in r.stdout
    r = cli("unpack", out, "-C", tmp_path / "elsewhere")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(tmp_path / "elsewhere" / "run1")
    assert tree(tiny_run) == tree(tmp_path / "elsewhere" / "run1")
    assert cli("verify", tmp_path / "elsewhere" / "run1").exit_code == 0
    for p in (tmp_path / "elsewhere" / "run1").rglob("*"):  # modes as the run had them: private stays private
        src = tiny_run / p.relative_to(tmp_path / "elsewhere" / "run1")
        want = 0o755 if p.is_dir() else (0o600 if not src.stat().st_mode & 0o077 else 0o644)
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_plain_tar_reads_it_with_manifest_first(tiny_run, tmp_path):
    out = pack(tiny_run, tmp_path / "a.aptrun.tar.zst").path
    listing = subprocess.run(["tar", "--zstd", "-tf", out], capture_output=True, text=True, check=True).stdout.split()
    assert listing[0] == "run1/aptrun.json"
    assert set(listing) == {"run1/aptrun.json"} | {f"run1/{f.path}" for f in load_manifest(tiny_run).files}
    (tmp_path / "x").mkdir()
    subprocess.run(["tar", "--zstd", "-xf", out, "-C", tmp_path / "x"], check=True)
    assert tree(tiny_run) == tree(tmp_path / "x" / "run1")


def test_pack_is_deterministic(tiny_run, tmp_path):
    a = pack(tiny_run, tmp_path / "a.aptrun.tar.zst", threads=1).path.read_bytes()
    b = pack(tiny_run, tmp_path / "b.aptrun.tar.zst", threads=2).path.read_bytes()
    assert a == b
    c = cli("pack", tiny_run, "-o", tmp_path / "a.aptrun.tar.zst", "--force")  # again, over the first
    assert c.exit_code == 0 and (tmp_path / "a.aptrun.tar.zst").read_bytes() == a


def test_default_output_name_in_current_folder(tiny_run, tmp_path):
    r = cli("pack", tiny_run, "--json", "-q", cwd=tmp_path)
    assert r.exit_code == 0
    info = json.loads(r.stdout)
    assert info["archive"] == "run1.aptrun.tar.zst" and (tmp_path / "run1.aptrun.tar.zst").is_file()
    assert info["digest"] == load_manifest(tiny_run).digest()


@pytest.mark.parametrize("which", ["best", "latest"])
def test_pack_one_checkpoint(tiny_run, tmp_path, which):
    src = Run.open(tiny_run)
    want = (src.best if which == "best" else src.latest).name
    r = cli("pack", tiny_run, "--checkpoints", which, "-o", tmp_path / "one.aptrun.tar.zst")
    assert r.exit_code == 0, r.output
    run_dir = unpack(tmp_path / "one.aptrun.tar.zst", tmp_path / "u")
    run = Run.open(run_dir)
    assert [c.name for c in run.checkpoints] == [want]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [want]
    assert run.latest.name == want and verify_run(run).problems == []
    assert cli("verify", run_dir).exit_code == 0
    assert (run_dir / "config.json").is_file() and (run_dir / "tokenizer" / "vocab.json").is_file()


def test_pack_refuses_damaged_run_and_leaves_no_file(run_copy, tmp_path):
    p = run_copy / "config.json"
    p.write_bytes(p.read_bytes().replace(b"1", b"2", 1))
    (run_copy / "stray.txt").write_text("x")
    out = tmp_path / "out.aptrun.tar.zst"
    r = cli("pack", run_copy, "-o", out)
    assert r.exit_code == 1 and no_traceback(r.output)
    assert "config.json" in r.stderr and "stray.txt" in r.stderr
    assert not out.exists() and not [x for x in tmp_path.iterdir() if x.name.startswith(".aptrun-tmp")]


def test_verify_and_inspect_archive(tiny_run, tmp_path):
    out = pack(tiny_run, tmp_path / "run1.aptrun.tar.zst").path
    r = cli("verify", out)
    assert r.exit_code == 0 and "ok" in r.stdout
    r = cli("inspect", out)
    assert r.exit_code == 0
    man = load_manifest(tiny_run)
    for c in man.checkpoints:
        assert c.name in r.stdout
    assert man.digest() in r.stdout and "latest" in r.stdout and "best" in r.stdout and "loss" in r.stdout
    info = json.loads(cli("inspect", out, "--json").stdout)
    assert info["kind"] == "archive" and info["latest"] == man.latest
    assert [c["step"] for c in info["checkpoints"]] == [c.step for c in man.checkpoints]
    assert info["archive_size"] == out.stat().st_size
    assert json.loads(cli("inspect", tiny_run, "--json").stdout)["digest"] == man.digest()
    m, size = read_archive_manifest(out)
    assert m.digest() == man.digest() and size == out.stat().st_size


def test_unpack_refuses_existing_destination_and_wrong_digest(tiny_run, tmp_path):
    out = pack(tiny_run, tmp_path / "run1.aptrun.tar.zst").path
    dest = tmp_path / "d"
    (dest / "run1").mkdir(parents=True)
    r = cli("unpack", out, "-C", dest)
    assert r.exit_code == 1 and "already exists" in r.stderr and no_traceback(r.output)
    r = cli("unpack", out, "-C", tmp_path / "e", "--expect-digest", "0" * 64)
    assert r.exit_code == 1 and "digest" in r.stderr
    assert not (tmp_path / "e").exists()  # DEST is left as it was found: not even created
    r = cli("unpack", out, "-C", tmp_path / "f", "--expect-digest", load_manifest(tiny_run).digest())
    assert r.exit_code == 0


def test_cli_misuse_is_exit_2_and_missing_files_exit_1(tmp_path):
    assert cli("pack").exit_code == 2
    assert cli("pack", tmp_path, "--checkpoints", "some").exit_code == 2
    r = cli("unpack", tmp_path / "nope.aptrun.tar.zst")
    assert r.exit_code == 1 and "no such file or folder" in r.stderr
    r = cli("verify", tmp_path)
    assert r.exit_code == 1 and "aptbundle init" in r.stderr


def test_commands_do_not_import_torch(tiny_run, tmp_path):
    out = tmp_path / "run1.aptrun.tar.zst"
    code = (
        "import sys\nfrom aptbundle.commands.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    for args in (["pack", str(tiny_run), "-o", str(out)], ["verify", str(out)], ["inspect", str(out)],
                 ["verify", str(tiny_run)], ["unpack", str(out), "-C", str(tmp_path / "u")],
                 ["push", str(tiny_run), str(tmp_path / "store")], ["ls", str(tmp_path / "store")],
                 ["pull", str(tmp_path / "store"), "run1", "-C", str(tmp_path / "p")]):
        r = sh(APTBUNDLE[0], "-c", code, *args)
        assert r.returncode == 0, (args, r.stderr)


def test_init_adopts_a_foreign_folder(tmp_path):
    hf = tmp_path / "hf_out"
    (hf / "checkpoints" / "checkpoint-500").mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    (hf / "checkpoints" / "checkpoint-500" / "trainer_state.json").write_text('{"epoch": 1.5}')
    (hf / "checkpoints" / "checkpoint-500" / "model.safetensors").write_bytes(
        b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    r = cli("init", hf, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["files"] == 3 and info["checkpoints"] == ["checkpoint-500"]
    assert cli("verify", hf).exit_code == 0
    r = cli("init", hf)  # again: what --update does, and nothing changed
    assert r.exit_code == 0 and "nothing changed" in r.stdout, r.output
    assert cli("pack", hf, "-o", tmp_path / "hf.aptrun.tar.zst").exit_code == 0


def test_init_adopts_a_hugging_face_trainer_output(tmp_path):
    hf = tmp_path / "hf_run"
    for step, loss in ((500, 2.5), (1000, 1.9)):
        ck = hf / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        (ck / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
        (ck / "trainer_state.json").write_text(json.dumps(
            {"epoch": step / 500, "global_step": step, "log_history": [{"loss": loss, "step": step}]}))
    (hf / "config.json").write_text("{}")
    r = cli("init", hf, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["checkpoints"] == ["checkpoint-500", "checkpoint-1000"]
    info = json.loads(cli("inspect", hf, "--json").stdout)
    assert [c["loss"] for c in info["checkpoints"]] == [2.5, 1.9] and info["latest"] == "checkpoint-1000"
    assert all(c["size"] > 0 for c in info["checkpoints"])
    assert cli("pack", hf, "--checkpoints", "latest", "-o", tmp_path / "hf.aptrun.tar.zst").exit_code == 0
    run_dir = unpack(tmp_path / "hf.aptrun.tar.zst", tmp_path / "u")
    assert (run_dir / "checkpoint-1000" / "model.safetensors").is_file()
    assert not (run_dir / "checkpoint-500").exists() and cli("verify", run_dir).exit_code == 0


def test_init_refuses_links_and_bad_names(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    (d / "ok.txt").write_text("1")
    os.symlink("/etc/passwd", d / "link")
    (d / "aux.txt").write_text("2")
    r = cli("init", d)
    assert r.exit_code == 1 and no_traceback(r.output)
    assert "link" in r.stderr and "aux.txt" in r.stderr
    assert not (d / "aptrun.json").exists()


def test_dense_archive_round_trips_and_says_it_needs_aptbundle(tiny_run, tmp_path):
    plain = pack(tiny_run, tmp_path / "p.aptrun.tar.zst").path
    r = cli("pack", tiny_run, "--dense", "-o", tmp_path / "d.aptrun.tar.zst", "--json")
    assert r.exit_code == 0, r.output
    dense = tmp_path / "d.aptrun.tar.zst"
    assert json.loads(r.stdout)["digest"] == load_manifest(tiny_run).digest()  # same content, same digest
    assert dense.stat().st_size < plain.stat().st_size
    assert cli("verify", dense).exit_code == 0
    info = json.loads(cli("inspect", dense, "--json").stdout)
    assert info["needs_aptbundle"] and info["codec"] == "dense"
    assert "unpack it with aptbundle" in cli("inspect", dense).stdout
    assert not json.loads(cli("inspect", plain, "--json").stdout)["needs_aptbundle"]
    assert cli("unpack", dense, "-C", tmp_path / "u").exit_code == 0
    assert tree(tiny_run) == tree(tmp_path / "u" / "run1")
    a = pack(tiny_run, tmp_path / "d2.aptrun.tar.zst", dense=True).path
    assert a.read_bytes() == dense.read_bytes()  # deterministic too


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dense_codec_on_each_float_type(tmp_path, dtype):
    import torch
    from safetensors.torch import save_file

    from aptbundle.transfer.codec import dense_width

    run = Run.create(tmp_path / "r", trainer=None)
    t = {"w": (torch.randn(300, 300) * 0.02).to(getattr(torch, dtype))}
    save_file(t, str(run.path / "model.safetensors"))
    moment = (torch.randn(300, 300) * 1e-3).to(getattr(torch, dtype))  # not a copy: zstd would dedup it
    torch.save({"state": {0: {"exp_avg": moment}}}, run.path / "optimizer.pt")
    for rel in ("model.safetensors", "optimizer.pt"):
        run.record_file(rel)
    run.save_manifest()
    want = 4 if dtype == "float32" else 2
    assert dense_width(run.path / "model.safetensors", "model.safetensors", 10**6) == want
    assert dense_width(run.path / "optimizer.pt", "optimizer.pt", 10**6) == want
    out = pack(run.path, tmp_path / "r.aptrun.tar.zst", dense=True).path
    plain = pack(run.path, tmp_path / "p.aptrun.tar.zst").path
    assert out.stat().st_size < plain.stat().st_size
    got = unpack(out, tmp_path / "u")
    assert tree(run.path) == tree(got)

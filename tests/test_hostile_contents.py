"""Hostile contents of a well-formed bundle: its hashes match by construction (the author wrote
the manifest), so everything read from it is checked before use. Each test plants one thing and
recomputes the hashes, as an attacker would."""

import json
import os
import shutil
import subprocess

import pytest

from aptbundle.ground.errors import UnsafePathError
from aptbundle.format.manifest import load_manifest
from aptbundle.ground.paths import normalize_relpath
from aptbundle.format.run import Run
from conftest import APTBUNDLE, cli, no_traceback, sh


def plant(run_dir, rel, data: bytes):
    """Replace a file of the run and list its new hash: only the content checks are left."""
    (run_dir / rel).write_bytes(data)
    run = Run.open(run_dir)
    run.record_file(rel)
    run.save_manifest()


def edit_manifest(run_dir, change):
    path = run_dir / "aptrun.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def test_a_number_out_of_range_is_refused_at_parse(run_copy):
    def huge(m):
        m["checkpoints"][0]["metrics"]["loss"] = 1.0
    edit_manifest(run_copy, huge)
    text = (run_copy / "aptrun.json").read_text().replace('"loss": 1.0', '"loss": 1e400', 1)
    (run_copy / "aptrun.json").write_text(text)
    for args in (["verify", run_copy], ["inspect", run_copy], ["pack", run_copy, "-o", run_copy.parent / "x"]):
        r = cli(*args)
        assert r.exit_code == 1 and "out of range" in r.stderr and no_traceback(r.output), r.output


@pytest.mark.parametrize("name", ["evil\u202etxt.pt", "a\u200bb", "x\u2066y"])
def test_invisible_and_bidi_characters_are_refused_in_names(name):
    with pytest.raises(UnsafePathError, match="invisible"):
        normalize_relpath(name)


def test_pack_never_overwrites_a_file_it_was_not_asked_to_replace(tiny_run, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    r = cli("pack", tiny_run, "-o", notes)
    assert r.exit_code == 1 and "--force" in r.stderr and notes.read_text() == "my notes"
    r = cli("pack", tiny_run, "-o", notes, "--force", "-q")
    assert r.exit_code == 0 and notes.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"


@pytest.mark.parametrize("name", ["/etc/passwd", "../../outside.txt", "a/b.txt"])
def test_the_corpus_name_from_the_bundle_is_a_plain_name(run_copy, tmp_path, name):
    src = json.loads((run_copy / "data/source.json").read_text())
    src["name"] = name
    plant(run_copy, "data/source.json", json.dumps(src).encode())
    r = cli("resume", run_copy, "-q")
    assert r.exit_code == 1 and "corpus name" in r.stderr and no_traceback(r.output), r.output


def test_a_fifo_in_place_of_the_corpus_is_refused_without_hanging(run_copy):
    src = json.loads((run_copy / "data/source.json").read_text())
    corpus = run_copy / "data" / src["name"]
    corpus.unlink()
    os.mkfifo(corpus)
    run = Run.open(run_copy)  # the manifest no longer lists it: resume must refuse, not read a pipe
    run.manifest.files = [f for f in run.manifest.files if f.path != f"data/{src['name']}"]
    run.save_manifest()
    r = cli("resume", run_copy, "-q")
    assert r.exit_code == 1 and "regular file" in r.stderr and no_traceback(r.output), r.output


def test_a_position_past_the_end_of_the_epoch_is_refused_not_looped_on(run_copy):
    latest = load_manifest(run_copy).latest
    rel = f"checkpoints/{latest}/trainer_state.json"
    state = json.loads((run_copy / rel).read_text())
    state["position"] = 10_000
    state["epoch"] = 0
    plant(run_copy, rel, json.dumps(state).encode())
    r = sh(*APTBUNDLE, "resume", run_copy, "-q", timeout=120)  # before the fix: 100% CPU, forever
    assert r.returncode == 1 and "position 10000" in r.stderr and no_traceback(r.stderr), r.stderr


def test_pack_of_one_checkpoint_does_not_follow_a_linked_folder(run_copy, tmp_path):
    latest = load_manifest(run_copy).latest
    outside = tmp_path / "outside"
    shutil.move(run_copy / "checkpoints" / latest, outside)
    os.symlink(outside, run_copy / "checkpoints" / latest)
    out = tmp_path / "one.aptrun.tar.zst"
    r = cli("pack", run_copy, "--checkpoints", "latest", "-o", out)
    assert r.exit_code == 1 and "symbolic link" in r.stderr and not out.exists(), r.output
    r = cli("verify", run_copy)
    assert r.exit_code == 1 and "symbolic link" in r.stderr


def test_a_run_name_of_250_bytes_packs_and_unpacks(tmp_path):
    name = "r" * 250
    run = Run.create(tmp_path / name, trainer=None)
    run.write_file("notes.txt", b"hello")
    run.save_manifest()
    out = tmp_path / "long.aptrun.tar.zst"
    assert cli("pack", run.path, "-o", out, "-q").exit_code == 0
    dest = tmp_path / "dest"
    r = cli("unpack", out, "-C", dest, "-q")
    assert r.exit_code == 0, r.output
    assert (dest / name / "notes.txt").read_bytes() == b"hello"
    assert subprocess.run(["tar", "--zstd", "-tf", out], capture_output=True).returncode == 0


def test_a_payload_among_dcp_items_is_refused_everywhere(tmp_path):
    """A `.distcp` file holds one torch.save zip per item; DCP's default planner unpickles the
    non-tensor ones freely, so every item is scanned like any torch file."""
    import io
    import pickle
    import zipfile

    from aptbundle.archive.writer import write_archive
    from aptbundle.transfer.codec import Encoding
    from conftest import trainer

    r = trainer("--run-dir", tmp_path / "s", "--sharded", "--epochs", "1", "--stop-at-step", "3", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "s"
    shard = next(f.path for f in load_manifest(run_dir).files if f.path.endswith(".distcp"))
    assert cli("verify", run_dir).exit_code == 0  # real DCP items pass the scan

    marker = tmp_path / "PWNED"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"param_groups": Boom()}, protocol=2))
    plant(run_dir, shard, (run_dir / shard).read_bytes() + evil.getvalue())
    r = cli("verify", run_dir)
    assert r.exit_code == 1 and ".distcp" in r.stderr and "system" in r.stderr and no_traceback(r.output)
    assert cli("pack", run_dir, "-o", tmp_path / "p.aptrun.tar.zst").exit_code == 1
    arc = tmp_path / "evil.aptrun.tar.zst"
    with open(arc, "wb") as f:
        write_archive(run_dir, load_manifest(run_dir), f, Encoding.choose(threads=1), scan=False)  # a stranger's packer
    r = cli("verify", arc)
    assert r.exit_code == 1 and ".distcp" in r.stderr
    r = cli("unpack", arc, "-C", tmp_path / "dest")
    assert r.exit_code == 1 and ".distcp" in r.stderr and not (tmp_path / "dest").exists()
    r = cli("resume", run_dir, "-q")
    assert r.exit_code == 1 and ".distcp" in r.stderr and no_traceback(r.output)
    assert not marker.exists()


def _declaring(tmp_path, size: int):
    """A tiny archive whose manifest declares one file of ``size`` bytes (the data never comes)."""
    import hashlib

    from archive_builder import member, tar, zst

    man = json.dumps({"format": "aptrun", "format_version": 1, "name": "big", "run_id": "x", "trainer": None,
                      "created_at": "t", "updated_at": "t", "checkpoints": [], "latest": None, "best": None,
                      "environment": {}, "history": [],
                      "files": [{"path": "blob.dat", "size": size, "sha256": hashlib.sha256(b"").hexdigest()}]})
    arc = tmp_path / "big.aptrun.tar.zst"
    arc.write_bytes(zst(tar(member("big/aptrun.json", man.encode()))))
    return arc


def test_an_archive_declaring_more_than_the_disk_holds_or_max_size_is_refused_first(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    arc = _declaring(tmp_path, free + (1 << 40))  # a few hundred bytes that claim more than the disk
    r = cli("unpack", arc, "-C", tmp_path / "d")
    assert r.exit_code == 1 and "bytes free" in r.stderr and not (tmp_path / "d").exists(), r.output
    arc = _declaring(tmp_path, 5 << 30)
    r = cli("unpack", arc, "-C", tmp_path / "d", "--max-size", "1G")
    assert r.exit_code == 1 and "--max-size" in r.stderr and not (tmp_path / "d").exists(), r.output
    assert cli("unpack", arc, "--max-size", "lots").exit_code == 2


def test_problem_lists_are_capped_and_names_from_a_bundle_are_escaped(run_copy):
    for i in range(150):
        (run_copy / f"stray-{i:03d}.txt").write_text("x")
    (run_copy / "evil\x1b]0;pwned\x07.txt").write_text("x")
    r = cli("verify", run_copy)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 102 and "51 more" in lines[-2], lines[-3:]
    assert "\x1b" not in r.stderr


def test_a_history_that_is_not_a_list_of_objects_does_not_break_inspect(run_copy):
    edit_manifest(run_copy, lambda m: m.update(history=[1, "x", None]))
    r = cli("inspect", run_copy)
    assert r.exit_code == 0 and no_traceback(r.output), r.output


def _torch_zip(payload: bytes) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/data/0", b"\0" * 16)
    return buf.getvalue()


def test_allowed_globals_that_allocate_or_rewrite_classes_are_refused(tmp_path):
    """Each of these names only allow-listed globals, yet loading it would allocate gigabytes,
    hand out a view past its storage, or change a class for the whole process."""
    import io
    import pickle
    import pickletools

    from aptbundle.ground.errors import UnsafeContentError
    from aptbundle.format.scan import scan_file

    g = pickle.GLOBAL
    # bytearray(2_500_000_000): 32 bytes that allocate 2.5 GB
    bomb = b"\x80\x02" + g + b"builtins\nbytearray\n" + b"\x8a\x05" + (2_500_000_000).to_bytes(5, "little") \
        + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP
    pickletools.dis(bomb, out=io.StringIO())  # a well-formed pickle
    # a 4-element storage viewed as 10**9 elements through stride 0
    view = (b"\x80\x02" + g + b"torch._utils\n_rebuild_tensor_v2\n" + pickle.MARK + pickle.MARK
            + pickle.BINUNICODE + (7).to_bytes(4, "little") + b"storage" + g + b"torch\nFloatStorage\n"
            + pickle.BINUNICODE + (1).to_bytes(4, "little") + b"0" + pickle.BINUNICODE + (3).to_bytes(4, "little")
            + b"cpu" + pickle.BININT1 + b"\x04" + pickle.TUPLE + pickle.BINPERSID + pickle.BININT1 + b"\0"
            + b"\x4a" + (10**9).to_bytes(4, "little") + pickle.TUPLE1 + pickle.BININT1 + b"\0" + pickle.TUPLE1
            + pickle.NEWFALSE + g + b"collections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.REDUCE
            + pickle.TUPLE + pickle.REDUCE + pickle.STOP)
    # BUILD on the class collections.Counter: replaces its attributes for everyone (DCP .metadata)
    counter = (b"\x80\x02" + g + b"collections\nCounter\n" + pickle.EMPTY_DICT + pickle.BINUNICODE
               + (6).to_bytes(4, "little") + b"update" + pickle.NONE + pickle.SETITEM + pickle.BUILD + pickle.STOP)
    cases = [("optimizer.pt", _torch_zip(bomb), "bytearray"), ("optimizer.pt", _torch_zip(view), "past"),
             ("dcp/.metadata", counter, "class")]
    for rel, data, match in cases:
        p = tmp_path / rel.replace("/", "_")
        p.write_bytes(data)
        with pytest.raises(UnsafeContentError, match=match):
            scan_file(p, rel)


def test_a_checkpoint_that_claims_the_runs_own_folder_is_refused(run_copy):
    first = load_manifest(run_copy).checkpoints[0].name
    edit_manifest(run_copy, lambda m: m["checkpoints"][0].update(path="data"))
    r = cli("resume", run_copy, "-q")
    assert r.exit_code == 1 and "claims the folder 'data'" in r.stderr and no_traceback(r.output), r.output
    assert (run_copy / "data" / "source.json").is_file()  # nothing was retired or replaced
    edit_manifest(run_copy, lambda m: m["checkpoints"][0].update(path="checkpoints"))
    r = cli("verify", run_copy)
    assert r.exit_code == 1 and "overlap" in r.stderr, (first, r.output)  # it holds the others


def test_a_config_that_does_not_fit_the_weights_is_refused_before_allocating(run_copy):
    cfg = json.loads((run_copy / "config.json").read_text())
    cfg.update(d_model=16384, n_heads=4, d_ff=256)
    plant(run_copy, "config.json", json.dumps(cfg).encode())
    r = cli("resume", run_copy, "-q")
    assert r.exit_code == 1 and "do not belong together" in r.stderr and no_traceback(r.output), r.output


def test_deep_paths_many_unlisted_members_and_chained_pax_headers_are_bounded(tmp_path):
    """Archives of a few kB that used to cost minutes or gigabytes: ~2,000-level paths, more
    unlisted members than anyone packs, extended headers chained without end."""
    from archive_builder import good_parts, manifest, member, tar, zst

    def nested(levels: int, name: str) -> bytes:
        files = {"/".join(["d"] * levels) + f"/f{k}": b"x" for k in range(20)}
        return zst(tar(member(f"{name}/aptrun.json", manifest(name, files)),
                       *(member(f"{name}/{p}", b, pax={"path": f"{name}/{p}"}) for p, b in files.items())))

    arcs = {"deep": nested(2000, "deep"), "ok": nested(200, "ok")}
    files, parts = good_parts("many")
    arcs["many"] = zst(tar(*parts, *(member(f"many/x{i}", b"") for i in range(10_050))))
    big_pax = {f"k{i}": "v" * 60 for i in range(900)}  # ~60 kB per header
    arcs["pax"] = zst(tar(*parts[:1], *([member("many/x", b"", pax=big_pax)] * 1)[:0],
                          b"".join(member("many/x", b"", pax=big_pax)[:-512] for _ in range(20)) + member("many/x")))
    for name, data in arcs.items():
        arc = tmp_path / f"{name}.aptrun.tar.zst"
        arc.write_bytes(data)
        for args in (["verify", arc], ["inspect", arc], ["unpack", arc, "-C", tmp_path / f"d-{name}"]):
            r = cli(*args)
            assert r.exit_code in (0, 1) and no_traceback(r.output), (name, args[0], r.output[-300:])
    assert sorted(os.listdir(tmp_path / "d-ok")) == ["ok"]  # 200 levels: deep, but it unpacks
    assert not any((tmp_path / f"d-{n}").exists() for n in ("deep", "many", "pax"))


def test_safetensors_with_a_gap_is_refused(tmp_path):
    import struct

    from aptbundle.ground.errors import UnsafeContentError
    from aptbundle.format.scan import scan_file

    raw = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                      "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}).encode()
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 12)
    with pytest.raises(UnsafeContentError, match="between tensors"):
        scan_file(p, "model.safetensors")


def test_inspect_escapes_what_a_manifest_says(run_copy):
    edit_manifest(run_copy, lambda m: m.update(trainer="apt\x1b]52;c;cHduZWQ=\x07\x1b[2J", created_at="\u202etxt"))
    r = cli("inspect", run_copy)
    assert r.exit_code == 0 and "\x1b" not in r.stdout and "\u202e" not in r.stdout and "\\x1b]52" in r.stdout


def test_deeply_nested_optimizer_state_is_a_clean_error(run_copy):
    """Deeply nested lists in param_groups: allowed content (lists), but loading it recurses."""
    import io
    import pickle
    import zipfile

    latest = load_manifest(run_copy).latest
    n = 20_000  # far past any recursion limit (the report used 200,000); {"param_groups": [[[...]]], "state": {}}, built opcode by opcode (pickle would recurse)
    body = (b"\x80\x02}X\x0c\x00\x00\x00param_groups" + b"]" * n + b"a" * (n - 1) + b"s"
            + b"X\x05\x00\x00\x00state}s.")
    assert pickle.loads(body).keys() == {"param_groups", "state"}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", body)
    plant(run_copy, f"checkpoints/{latest}/optimizer.pt", buf.getvalue())
    r = cli("resume", run_copy, "--epochs", "3", "-q")
    assert r.exit_code == 1 and no_traceback(r.output), r.output

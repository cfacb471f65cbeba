"""No code from a bundle, ever: planted pickles and malformed safetensors are refused unread."""

import io
import json
import os
import pickle
import struct
import zipfile

import pytest

from aptbundle.archive.writer import write_archive
from aptbundle.transfer.codec import Encoding
from aptbundle.ground.errors import UnsafeContentError
from aptbundle.format.manifest import load_manifest
from aptbundle.format.run import Run
from aptbundle.format.scan import scan_file
from conftest import cli, no_traceback


class Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_torch_file(marker) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"state": Boom(marker)}, protocol=2))
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def plant(run_dir, rel, data):
    """Replace a file and fix the manifest so that its hash matches: only the content check is left."""
    (run_dir / rel).write_bytes(data)
    run = Run.open(run_dir)
    run.record_file(rel)
    run.save_manifest()


@pytest.mark.parametrize("victim", ["optimizer.pt", "rng_state.pt"])
def test_planted_pickle_is_refused_by_verify_unpack_and_resume(run_copy, tmp_path, victim):
    marker = tmp_path / "PWNED"
    rel = f"checkpoints/{load_manifest(run_copy).latest}/{victim}"
    plant(run_copy, rel, evil_torch_file(marker))
    r = cli("verify", run_copy)
    assert r.exit_code == 1 and victim in r.stderr and "system" in r.stderr and no_traceback(r.output)

    r = cli("pack", run_copy, "-o", tmp_path / "x.aptrun.tar.zst")
    assert r.exit_code == 1 and victim in r.stderr

    arc = tmp_path / "evil.aptrun.tar.zst"
    with open(arc, "wb") as f:
        write_archive(run_copy, load_manifest(run_copy), f, Encoding.choose(threads=1), scan=False)  # a stranger's packer
    r = cli("verify", arc)
    assert r.exit_code == 1 and victim in r.stderr
    dest = tmp_path / "dest"
    r = cli("unpack", arc, "-C", dest)
    assert r.exit_code == 1 and victim in r.stderr and no_traceback(r.output)
    assert not dest.exists()  # left as it was found

    r = cli("resume", run_copy, "--quiet")
    assert r.exit_code == 1 and victim in r.stderr and no_traceback(r.output)
    assert not marker.exists()


def test_adopted_folder_with_evil_pt_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    d = tmp_path / "hf"
    d.mkdir()
    (d / "optimizer.pt").write_bytes(evil_torch_file(marker))
    r = cli("init", d)
    assert r.exit_code == 1 and "optimizer.pt" in r.stderr and no_traceback(r.output)
    assert not (d / "aptrun.json").exists() and not marker.exists()


def test_training_args_bin_is_carried_untrusted_never_loaded_and_refused_with_strict(tmp_path):
    """The Hugging Face Trainer never loads training_args.bin on resume: it travels, marked."""
    marker = tmp_path / "PWNED"
    d = tmp_path / "hf"
    d.mkdir()
    (d / "training_args.bin").write_bytes(evil_torch_file(marker))
    r = cli("init", d, "--strict")
    assert r.exit_code == 1 and "training_args.bin" in r.stderr and not (d / "aptrun.json").exists()
    r = cli("init", d)
    assert r.exit_code == 0 and "training_args.bin" in r.stderr and "never loaded" in r.stderr
    assert load_manifest(d).untrusted == ["training_args.bin"]
    r = cli("verify", d)
    assert r.exit_code == 0 and "never loaded" in r.stderr
    assert cli("verify", d, "--strict").exit_code == 1
    assert "never loaded" in cli("inspect", d).stdout
    assert not marker.exists()


def test_real_torch_files_pass_the_scan(tiny_run):
    for p in tiny_run.rglob("*.pt"):
        names = scan_file(p, p.name)
        if p.name in ("optimizer.pt", "rng_state.pt"):
            assert "torch._utils._rebuild_tensor_v2" in names  # it did read the globals


@pytest.mark.parametrize("body,match", [
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     '"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "duplicate key"),
    ('{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', "outside"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     '"b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', "overlap"),
    ('{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', "needs 12"),
    ('{"a": {"dtype": "EVIL", "shape": [2], "data_offsets": [0, 8]}}', "unknown dtype"),
    ('[1, 2]', "not a JSON object"),
])
def test_safetensors_header_checks(tmp_path, body, match):
    p = tmp_path / "model.safetensors"
    raw = body.encode()
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    with pytest.raises(UnsafeContentError, match=match):
        scan_file(p, "model.safetensors")


def test_safetensors_huge_header_claim(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(UnsafeContentError, match="header claims"):
        scan_file(p, "model.safetensors")


def test_damaged_safetensors_in_run_is_refused_before_loading(run_copy):
    rel = f"checkpoints/{load_manifest(run_copy).latest}/model.safetensors"
    data = bytearray((run_copy / rel).read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 4
    raw = json.dumps(header).encode()
    plant(run_copy, rel, struct.pack("<Q", len(raw)) + raw + bytes(data[8 + n:]))
    r = cli("verify", run_copy)
    assert r.exit_code == 1 and "model.safetensors" in r.stderr
    r = cli("resume", run_copy, "--quiet")
    assert r.exit_code == 1 and "model.safetensors" in r.stderr and no_traceback(r.output)


def _zip_entries(data: bytes) -> dict:
    """name -> (central record offset, local header offset) of a zip made by ``zipfile``."""
    out = {}
    pos = struct.unpack_from("<I", data, data.rfind(b"PK\x05\x06") + 16)[0]  # where the directory starts
    while data[pos:pos + 4] == b"PK\x01\x02":
        nlen, elen, clen = struct.unpack_from("<HHH", data, pos + 28)
        name = data[pos + 46:pos + 46 + nlen].decode()
        out[name] = (pos, struct.unpack_from("<I", data, pos + 42)[0])
        pos += 46 + nlen + elen + clen
    return out


def test_a_zip_directory_pointing_into_another_entry_is_refused(tmp_path):
    """torch.load follows the central directory: a pickle hidden inside a tensor's bytes, which
    the directory points at, must not slip past a scan that walks the entries in order."""
    marker = tmp_path / "PWNED"
    hidden = io.BytesIO()
    with zipfile.ZipFile(hidden, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"state": Boom(marker)}, protocol=2))
    inner = hidden.getvalue()
    inner = inner[:inner.find(b"PK\x01\x02")]  # the local header and the evil pickle only
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"ok": 1}, protocol=2))
        z.writestr("archive/data/0", inner)
    data = bytearray(buf.getvalue())
    entries = _zip_entries(bytes(data))
    _, tensor_at = entries["archive/data/0"]
    nlen, elen = struct.unpack_from("<HH", data, tensor_at + 26)
    inner_at = tensor_at + 30 + nlen + elen  # where the hidden local header starts
    cd_at, _ = entries["archive/data.pkl"]
    crc, csize, usize = struct.unpack_from("<III", inner, 14)
    struct.pack_into("<III", data, cd_at + 16, crc, csize, usize)
    struct.pack_into("<I", data, cd_at + 42, inner_at)
    assert zipfile.ZipFile(io.BytesIO(bytes(data))).read("archive/data.pkl") == inner[30 + len("archive/data.pkl"):]
    p = tmp_path / "optimizer.pt"
    p.write_bytes(bytes(data))
    with pytest.raises(UnsafeContentError, match="does not match the entry"):
        scan_file(p, "optimizer.pt")


@pytest.mark.parametrize("flag,method,match", [(0x1, 0, "encrypted"), (0, 99, "compression method")])
def test_zip_entries_torch_never_writes_are_refused(tmp_path, flag, method, match):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"ok": 1}, protocol=2))
    data = bytearray(buf.getvalue())
    struct.pack_into("<HH", data, 6, flag, method)
    p = tmp_path / "x.pt"
    p.write_bytes(bytes(data))
    with pytest.raises(UnsafeContentError, match=match):
        scan_file(p, "x.pt")


def test_every_pickle_of_a_legacy_torch_file_is_walked(tmp_path):
    """A legacy torch.save file is five pickles in a row; the object itself is the fourth."""
    marker = tmp_path / "PWNED"
    parts = [pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True})]
    p = tmp_path / "legacy.pt"
    p.write_bytes(b"".join(parts) + pickle.dumps(Boom(marker), protocol=2) + pickle.dumps([], protocol=2))
    with pytest.raises(UnsafeContentError, match="system"):
        scan_file(p, "legacy.pt")
    assert not marker.exists()

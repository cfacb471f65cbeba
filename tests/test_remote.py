"""Archives in object storage, through fsspec, against a real S3 server on loopback (moto)."""

import os

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from aptbundle.format.manifest import load_manifest  # noqa: E402
from conftest import APTBUNDLE, cli, no_traceback, sh  # noqa: E402


def test_pack_to_and_unpack_from_s3(s3, tiny_run, tmp_path):
    fs, env = s3
    url = "s3://runs/run1.aptrun.tar.zst"
    r = sh(*APTBUNDLE, "pack", tiny_run, "-o", url, "--json", "-q", env=env)
    assert r.returncode == 0, r.stderr
    local = cli("pack", tiny_run, "-o", tmp_path / "local.aptrun.tar.zst")
    assert local.exit_code == 0
    assert fs.cat(url) == (tmp_path / "local.aptrun.tar.zst").read_bytes()  # byte-identical upload
    r = sh(*APTBUNDLE, "verify", url, env=env)
    assert r.returncode == 0, r.stderr
    r = sh(*APTBUNDLE, "inspect", url, "--json", env=env)
    assert r.returncode == 0 and load_manifest(tiny_run).digest() in r.stdout
    r = sh(*APTBUNDLE, "unpack", url, "-C", tmp_path / "dest", env=env)
    assert r.returncode == 0, r.stderr
    for f in load_manifest(tiny_run).files:
        assert (tmp_path / "dest/run1" / f.path).read_bytes() == (tiny_run / f.path).read_bytes()
    r = sh(*APTBUNDLE, "pack", tiny_run, "-o", "s3://runs/folder/", "-q", env=env)
    assert r.returncode == 0 and fs.exists("runs/folder/run1.aptrun.tar.zst")


def test_corrupted_remote_archive_is_refused(s3, tiny_run, tmp_path):
    fs, env = s3
    good = tmp_path / "g.aptrun.tar.zst"
    assert cli("pack", tiny_run, "-o", good).exit_code == 0
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0x55
    fs.pipe("runs/bad.aptrun.tar.zst", bytes(data))
    for cmd in (["verify"], ["unpack", "-C", str(tmp_path / "d")]):
        r = sh(*APTBUNDLE, cmd[0], "s3://runs/bad.aptrun.tar.zst", *cmd[1:], env=env)
        assert r.returncode == 1 and no_traceback(r.stderr), r.stderr
    assert not (tmp_path / "d").exists() or os.listdir(tmp_path / "d") == []
    r = sh(*APTBUNDLE, "unpack", "s3://runs/missing.aptrun.tar.zst", env=env)
    assert r.returncode == 1 and "no such remote archive" in r.stderr

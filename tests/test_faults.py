"""A store that fails is survived: a fault-injecting proxy (tests/faults.py, on the loopback
address) between aptbundle and the loopback S3 server. Whatever the fault, push, pull and gc end
with exit 0, or exit 1 and one line; never a traceback. A pull that fails leaves DEST as it was;
a training run backing up through an outage finishes, and its state reaches the store once the
faults stop."""

from __future__ import annotations

import os

import shutil

import pytest

from conftest import cli, no_traceback, trainer
from faults import FAULTS, FaultProxy
from test_store import random_run, same_files
from test_transfer import snapshot


@pytest.fixture
def faulty(s3):
    """The proxy, with aptbundle's S3 client pointed at it (the server behind it is the loopback one)."""
    import fsspec.config
    import s3fs

    fs, env = s3
    host, port = env["FSSPEC_S3_ENDPOINT_URL"].rsplit("/", 1)[-1].split(":")
    proxy = FaultProxy((host, int(port)), seed=7)
    old = dict(fsspec.config.conf.get("s3", {}))
    fsspec.config.conf["s3"] = {**old, "endpoint_url": proxy.url}
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield proxy
    finally:
        proxy.close()
        fsspec.config.conf["s3"] = old
        s3fs.S3FileSystem.clear_instance_cache()


def one_line(r) -> bool:
    """Exit 0, or exit 1 with one error line and no traceback (a verification that found one
    damaged file says so in its own line, then counts it)."""
    if not no_traceback(r.output):
        return False
    if r.exit_code == 0:
        return True
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    counted = len(errors) == 2 and errors[1].endswith(": 1 problem(s)")
    return r.exit_code == 1 and (len(errors) == 1 or counted)


# 500 takes 503's path and reset-before the outage's, one request at a time: with APTBUNDLE_LONG=1
QUICK = [f for f in FAULTS if os.environ.get("APTBUNDLE_LONG") or f not in ("500", "reset-before")]


@pytest.mark.parametrize("fault", QUICK)
def test_every_fault_is_one_line_or_nothing_and_a_failed_pull_changes_nothing(faulty, s3, tmp_path, fault):
    fs, _ = s3
    store = f"s3://runs/faults-{fault}"
    run = random_run(tmp_path / "src" / "run1", {"a.dat": 300_000, "b.txt": b"hello" * 2000, "c.dat": 70_000})
    assert cli("push", run, store, "-q").exit_code == 0  # a clean copy to pull from
    (run / "d.dat").write_bytes(b"new" * 50_000)
    assert cli("init", run, "-q").exit_code == 0
    dest = tmp_path / "dest"
    assert cli("pull", store, "run1", "-C", dest, "-q").exit_code == 0
    before = snapshot(dest)
    faulty.set(fault, rate=1.0 if fault == "outage" else 0.1)
    for args in (("push", run, store, "-q"), ("pull", store, "run1", "-C", dest, "-q"), ("ls", store),
                 ("gc", store, "--grace", "0")):
        r = cli(*args)
        assert one_line(r), (fault, args, r.output)
        if args[0] == "pull" and r.exit_code != 0:
            assert snapshot(dest) == before, fault
    faulty.set(None)
    assert cli("push", run, store, "-q").exit_code == 0
    assert cli("pull", store, "run1", "-C", tmp_path / "again", "-q").exit_code == 0
    same_files(run, tmp_path / "again" / "run1")
    assert faulty.injected > 0


def test_training_backs_up_through_an_outage_and_the_next_push_carries_its_state(faulty, tmp_path):
    store = "s3://runs/outage"
    faulty.set("outage")
    r = trainer("--run-dir", tmp_path / "r", "--stop-at-step", "2", "--save-every", "2", "--backup-to", store,
                cwd=tmp_path)
    assert r.returncode == 0 and "warning: backup" in r.stderr and no_traceback(r.stderr), r.stderr
    faulty.set(None)
    assert cli("push", tmp_path / "r", store, "-q").exit_code == 0
    assert cli("pull", store, "r", "-C", tmp_path / "back", "-q").exit_code == 0
    same_files(tmp_path / "r", tmp_path / "back" / "r")


def test_a_hugging_face_run_with_the_callback_finishes_through_an_outage(faulty, tmp_path, capfd):
    pytest.importorskip("transformers")
    import frameworks as fw
    from aptbundle.integrations.transformers import AptbundleCallback

    store = "s3://runs/hf-outage"
    faulty.set("outage")
    out = tmp_path / "run"
    fw.hf_trainer(out, steps=20, callbacks=[AptbundleCallback(store)])
    assert "warning: backup" in capfd.readouterr().err
    faulty.set(None)
    assert cli("init", out, "-q").exit_code == 0
    assert cli("push", out, store, "-q").exit_code == 0
    r = cli("ls", store)
    assert r.exit_code == 0 and "Hugging Face Trainer" in r.stdout, r.output
    shutil.rmtree(out)


def test_gc_aborts_multipart_uploads_a_killed_push_left(s3, tmp_path):
    fs, _ = s3
    run = random_run(tmp_path / "run1", {"a.dat": 1000})
    store = "s3://runs/multipart"
    assert cli("push", run, store, "-q").exit_code == 0
    fs.call_s3("create_multipart_upload", Bucket="runs", Key="multipart/blobs/sha256/ab/" + "ab" * 32)
    assert fs.call_s3("list_multipart_uploads", Bucket="runs", Prefix="multipart/").get("Uploads")
    assert cli("push", run, store, "-q").exit_code == 0  # a push leaves others' uploads alone
    assert fs.call_s3("list_multipart_uploads", Bucket="runs", Prefix="multipart/").get("Uploads")
    assert cli("gc", store, "--grace", "0").exit_code == 0  # (the loopback server dates every upload 2010)
    assert not fs.call_s3("list_multipart_uploads", Bucket="runs", Prefix="multipart/").get("Uploads")

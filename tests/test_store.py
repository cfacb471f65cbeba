"""The run store: deduplicated push and pull, ls, gc, signatures, backups while training.

Real runs (trained here, or adopted folders of random bytes), a real local store and the
loopback S3 server, the CLI as typed; SIGKILL where the promise is about being killed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from aptbundle.layouts.adopt import adopt
from aptbundle.format.manifest import load_manifest
from aptbundle.format.signature import sign
from aptbundle.store import locks
from aptbundle.store.backend import Store
from aptbundle.store import layout
from aptbundle.store.maintain import gc, list_store
from aptbundle.store.push import push
from aptbundle.store.pull import pull
from conftest import APTBUNDLE, KILL_ROUNDS, PY, cli, no_traceback, trainer

STORE_KILL_ROUNDS = max(10, KILL_ROUNDS)


def store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def random_run(path: Path, files: dict[str, int | bytes], seed: int = 0) -> Path:
    """An adopted run of the given files (sizes become random bytes)."""
    rng = random.Random(seed)
    for rel, what in files.items():
        p = path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(what if isinstance(what, bytes) else rng.randbytes(what))
    adopt(path)
    return path


def same_files(a: Path, b: Path) -> None:
    man = load_manifest(a)
    assert load_manifest(b).digest() == man.digest()
    for f in man.files:
        assert (b / f.path).read_bytes() == (a / f.path).read_bytes(), f.path


def pushed(*args) -> dict:
    r = cli("push", *args, "--json", "-q")
    assert r.exit_code == 0, r.output + r.stderr
    return json.loads(r.stdout)


# -- push and pull -------------------------------------------------------------------------------
def test_second_push_sends_only_the_new_checkpoints_and_pull_fetches_only_them(tmp_path):
    work, store = tmp_path / "work", tmp_path / "store"
    work.mkdir()
    assert trainer("--run-dir", "run1", "--epochs", "2", "--save-every", "10", "--stop-at-step", "20", "-q",
                   cwd=work).returncode == 0
    first = pushed(work / "run1", store)
    assert first["sent_files"] == first["files"] and first["present_files"] == 0
    size_after_first = store_bytes(store)
    old = load_manifest(work / "run1")
    cli("pull", store, "run1", "-C", tmp_path / "copy", "-q")

    assert trainer("--run-dir", work / "run1", "--resume-from", "latest", "--stop-at-step", "40", "-q").returncode == 0
    new = load_manifest(work / "run1")
    assert {"step-00000030", "step-00000040"} <= {c.name for c in new.checkpoints} - {c.name for c in old.checkpoints}
    old_hashes = {f.sha256 for f in old.files}
    new_bytes = sum(f.size for f in new.files if f.sha256 not in old_hashes)
    second = pushed(work / "run1", store)
    grown = store_bytes(store) - size_after_first
    bound = new_bytes + len(new.to_bytes()) + 64 + new_bytes // 100  # zstd framing of incompressible data
    assert second["sent_bytes"] <= bound and grown <= bound + len(new.to_bytes()), (second, grown, bound)
    assert second["present_files"] == len({f.sha256 for f in new.files} & old_hashes) > 0

    r = cli("pull", store, "run1", "-C", tmp_path / "copy", "--json", "-q")  # the older copy is updated
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["fetched_files"] == len({f.sha256 for f in new.files} - old_hashes) and res["reused_files"] > 0
    same_files(work / "run1", tmp_path / "copy/run1")
    assert cli("verify", tmp_path / "copy/run1").exit_code == 0


def test_runs_sharing_a_corpus_store_it_once(tmp_path):
    corpus = random.Random(7).randbytes(1 << 20)
    a = random_run(tmp_path / "a/run_a", {"data/corpus.txt": corpus, "weights.dat": 300_000}, seed=1)
    b = random_run(tmp_path / "b/run_b", {"data/corpus.txt": corpus, "weights.dat": 300_000}, seed=2)
    store = tmp_path / "store"
    pushed(a, store)
    second = pushed(b, store)
    assert second["present_files"] == 1 and second["present_bytes"] == len(corpus)
    assert second["sent_bytes"] < len(corpus) // 2  # the corpus did not travel again
    sha = load_manifest(a).file_map()["data/corpus.txt"].sha256
    assert [p.name for p in (store / "objects").rglob("*") if p.is_file()].count(sha) == 1
    r = cli("ls", store, "--json")
    runs = {x["name"]: x for x in json.loads(r.stdout)["runs"]}
    assert set(runs) == {"run_a", "run_b"} and all(x["missing_blobs"] == 0 for x in runs.values())
    assert runs["run_a"]["digest"] == load_manifest(a).digest()
    for run in (a, b):
        assert cli("pull", store, run.name, "-C", tmp_path / "out", "-q").exit_code == 0
        same_files(run, tmp_path / "out" / run.name)


def test_objects_are_zstd_files_and_pull_back_exactly(tiny_run, tmp_path):
    from aptbundle.store.reader import ObjectReader

    store = tmp_path / "store"
    res = pushed(tiny_run, store, "--dense")  # accepted from older scripts; grouping is the default
    assert res["sent_files"] > 0 and res["sent_objects"] > 0
    weights = max(load_manifest(tiny_run).files, key=lambda f: f.size)
    recipe = ObjectReader(Store(store)).recipe(weights.sha256, weights.size)
    part = max((p for p in recipe.parts if p.sha256), key=lambda p: p.size)
    blob = (store / layout.object(part.sha256)).read_bytes()
    assert blob[:4] == (0x184D2A5A).to_bytes(4, "little")  # a skippable frame names the encoding
    r = subprocess.run(["zstd", "-dc"], input=blob, capture_output=True) if shutil.which("zstd") else None
    if r is not None:
        assert r.returncode == 0 and len(r.stdout) == part.size  # zstd skips the marker
    assert cli("pull", store, "run1", "-C", tmp_path / "out", "-q").exit_code == 0
    same_files(tiny_run, tmp_path / "out/run1")


def test_push_pull_ls_gc_on_s3(s3, tmp_path):
    fs, _env = s3
    run = random_run(tmp_path / "run1", {"a.dat": 200_000, "sub/b.txt": b"hello" * 1000})
    url = "s3://runs/store"
    assert pushed(run, url)["sent_files"] == 2
    again = pushed(run, url)
    assert again["sent_files"] == 0 and again["present_files"] == 2
    assert fs.exists("runs/store/refs/run1")
    r = cli("ls", url, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["runs"][0]["digest"] == load_manifest(run).digest()
    r = cli("pull", url, "run1", "-C", tmp_path / "out", "--json", "-q")
    assert r.exit_code == 0, r.stderr
    same_files(run, tmp_path / "out/run1")
    fs.pipe("runs/store/objects/sha256/00/" + "0" * 64, b"orphan")
    r = cli("gc", url, "--grace", "0", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["deleted_blobs"] == 1
    assert not fs.exists("runs/store/objects/sha256/00/" + "0" * 64)
    assert cli("pull", url, "run1", "-C", tmp_path / "out2", "-q").exit_code == 0


# -- crashes and concurrency -----------------------------------------------------------------------
def _complete_runs_only(store: Path, run: Path, dest: Path) -> list[str]:
    """Every run the store lists pulls back whole; returns their names."""
    listed = list_store(store) if (store / "refs").exists() else []
    for r in listed:
        assert "error" not in r and r["missing_blobs"] == 0, r
        pull(store, r["name"], dest)
        same_files(run, dest / r["name"])
        shutil.rmtree(dest / r["name"])
    return [r["name"] for r in listed]


@pytest.mark.slow
@pytest.mark.parametrize("rounds", [STORE_KILL_ROUNDS])
def test_sigkill_during_push_leaves_only_complete_runs_and_the_next_push_completes_it(tmp_path, rounds):
    run = random_run(tmp_path / "run1", {f"ckpt/part-{i:02d}.dat": 1 << 20 for i in range(32)})
    t0 = time.monotonic()
    subprocess.run([*APTBUNDLE, "push", run, tmp_path / "timing", "-q"], check=True)
    full = time.monotonic() - t0
    rng = random.Random(1234)
    outcomes = {"nothing": 0, "partial": 0, "complete": 0}
    for i in range(rounds):
        store = tmp_path / f"store{i}"
        p = subprocess.Popen([*APTBUNDLE, "push", run, store, "-q"], stderr=subprocess.DEVNULL)
        time.sleep(full * (0.3 + 0.7 * (i + rng.random()) / rounds))  # a push's start-up is most of it
        p.send_signal(signal.SIGKILL)
        p.wait()
        names = _complete_runs_only(store, run, tmp_path / "check")
        blobs = list((store / "objects").rglob("*")) if (store / "objects").exists() else []
        outcomes["complete" if names else "partial" if blobs else "nothing"] += 1
        res = push(run, store)  # the next push completes the run, sending only what is missing
        assert res.sent_files + res.present_files == 32
        assert _complete_runs_only(store, run, tmp_path / "check") == ["run1"]
        assert not any(locks.others(Store(store)))  # the killed push's lock is gone (its process is)
    assert outcomes["partial"] >= 1, outcomes  # some kills landed in the middle of a push


def test_gc_waits_for_a_running_push(tmp_path):
    from aptbundle.ground.errors import StoreError

    run = random_run(tmp_path / "run1", {"a.dat": 100_000, "b.dat": 100_000})
    store = tmp_path / "store"
    man = load_manifest(run)
    sha_a = man.file_map()["a.dat"].sha256
    push(random_run(tmp_path / "other/run1", {"a.dat": (run / "a.dat").read_bytes()}), store)
    (store / "refs/run1").unlink()  # a.dat's object is now garbage, and old
    old = time.time() - 7200
    for p in store.rglob("*"):
        os.utime(p, (old, old))
    s = Store(store)
    with locks.pushing(s, sorted({f.sha256 for f in man.files}), man.digest()):
        # the push may have seen a.dat in the store and will not send it: gc waits, deleting nothing
        with pytest.raises(StoreError, match="push"):
            gc(store, grace_s=0, wait_s=0.5)
        assert (store / layout.object(sha_a)).exists()
    assert gc(store, grace_s=0).deleted_blobs == 1  # once the push is gone, garbage goes


def test_a_push_waits_for_a_running_gc(tmp_path, monkeypatch):
    run = random_run(tmp_path / "run1", {"a.dat": 50_000})
    store = tmp_path / "store"
    push(run, store)
    (store / "refs/run1").unlink()
    old = time.time() - 7200
    for p in store.rglob("*"):
        if p.is_file():
            os.utime(p, (old, old))
    s = Store(store)
    import threading

    with locks.collecting(s):
        t = threading.Thread(target=lambda: push(run, store))
        t.start()
        time.sleep(0.6)
        assert t.is_alive() and not (store / "refs/run1").exists()  # waiting for the gc
    t.join(10)
    assert (store / "refs/run1").exists()
    assert gc(store, grace_s=0).deleted_blobs == 0
    pull(store, "run1", tmp_path / "out")
    same_files(run, tmp_path / "out/run1")


def test_gc_running_beside_a_real_push_deletes_nothing_it_needs(tmp_path):
    run = random_run(tmp_path / "run1", {f"p{i}.dat": 1 << 20 for i in range(12)})
    store = tmp_path / "store"
    random_run(tmp_path / "junk/run1", {f"p{i}.dat": 1 << 20 for i in range(12)})  # same bytes, pushed and dropped
    push(tmp_path / "junk/run1", store)
    (store / "refs/run1").unlink()
    old = time.time() - 7200
    for p in store.rglob("*"):
        if p.is_file():
            os.utime(p, (old, old))
    p = subprocess.Popen([*APTBUNDLE, "push", run, store, "-q"])
    collected = 0
    while p.poll() is None:
        try:
            collected += 1
            gc(store, grace_s=0)
        except Exception as e:  # another gc is never running; nothing else may fail
            raise AssertionError(e)
    assert p.returncode == 0 and collected >= 1
    pull(store, "run1", tmp_path / "out")
    same_files(run, tmp_path / "out/run1")


# -- backups while training ------------------------------------------------------------------------
def _pushed_step(store: Path) -> int:
    """The latest step of the newest pushed version (0 for none): a ref and a manifest read."""
    from aptbundle.ground.errors import AptBundleError
    from aptbundle.store.pull import resolve

    if not (store / "refs/run1").exists():
        return 0
    try:
        man = resolve(Store(store), "run1")[2]
    except AptBundleError:
        return 0
    return next((c.step for c in man.checkpoints if c.name == man.latest), 0)


def test_backup_to_survives_sigkill_and_resume_from_the_store_is_exact(tmp_path):
    args = ["--epochs", "4", "--save-every", "10"]
    ref = tmp_path / "ref"
    ref.mkdir()
    assert trainer("--run-dir", "run1", *args, "-q", cwd=ref).returncode == 0
    work, store = tmp_path / "work", tmp_path / "store"
    work.mkdir()
    p = subprocess.Popen([PY, "-m", "apt_model.training.trainer", "--run-dir", "run1", *args, "-q",
                          "--backup-to", store], cwd=work, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None and _pushed_step(store) < 10:
        time.sleep(0.02)  # killed as soon as the first backup landed, while training goes on
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the trainer finished before it could be killed"
    pushed_step = list_store(store)[0]["step"]
    assert 10 <= pushed_step < 112
    shutil.rmtree(work)  # the machine is lost: run folder and working directory
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    r = cli("resume", "--from", f"{store}/run1", "-q", cwd=fresh)
    assert r.exit_code == 0, r.output + r.stderr
    final = load_manifest(ref / "run1").latest
    assert load_manifest(fresh / "run1").latest == final
    for f in ("model.safetensors", "optimizer.pt"):
        assert (fresh / "run1/checkpoints" / final / f).read_bytes() == (ref / "run1/checkpoints" / final / f).read_bytes()


def test_sigterm_saves_and_the_final_push_holds_that_checkpoint(tmp_path):
    store = tmp_path / "store"
    p = subprocess.Popen([PY, "-m", "apt_model.training.trainer", "--run-dir", "run1", "--epochs", "6",
                          "--save-every", "10", "-q", "--backup-to", store], cwd=tmp_path, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None and not (store / "refs/run1").exists():
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    man = load_manifest(tmp_path / "run1")
    assert list_store(store)[0]["digest"] == man.digest()  # the checkpoint SIGTERM saved was pushed
    assert list_store(store)[0]["latest"] == man.latest


def test_backup_pushes_in_the_background_and_a_failing_store_never_stops_training(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    r = trainer("--run-dir", tmp_path / "run1", "--epochs", "1", "--save-every", "10", "--backup-to", blocker)
    assert r.returncode == 0 and "backup to" in r.stderr + r.stdout and "failed" in r.stderr + r.stdout
    store = tmp_path / "store"
    r = trainer("--run-dir", tmp_path / "run2", "--epochs", "1", "--save-every", "10", "--backup-to", store)
    assert r.returncode == 0, r.stderr
    assert list_store(store)[0]["digest"] == load_manifest(tmp_path / "run2").digest()  # the final state


# -- hostile stores ------------------------------------------------------------------------------
@pytest.fixture
def small_store(tmp_path):
    run = random_run(tmp_path / "src/run1", {"a.dat": 70_000, "data/b.txt": b"text" * 500})
    store = tmp_path / "store"
    push(run, store)
    return run, store


def _refused(store, dest, *more, msg: str = "") -> str:
    r = cli("pull", store, "run1", "-C", dest, *more)
    assert r.exit_code == 1, r.output
    assert no_traceback(r.output + r.stderr) and msg in r.stderr, r.stderr
    assert not dest.exists() or not any(dest.iterdir())  # nothing left behind
    return r.stderr


def test_pull_refuses_an_altered_blob_and_a_missing_one(small_store, tmp_path):
    run, store = small_store
    sha = load_manifest(run).file_map()["a.dat"].sha256
    blob = store / layout.object(sha)
    blob.write_bytes(blob.read_bytes()[:-200] + os.urandom(200))
    _refused(store, tmp_path / "d1", msg="a.dat")
    blob.unlink()
    _refused(store, tmp_path / "d2", msg="missing")


@pytest.mark.parametrize("change", [
    {"files": [{"path": "../evil", "size": 1, "sha256": "0" * 64}]},
    {"files": [{"path": "/etc/passwd", "size": 1, "sha256": "0" * 64}]},
    {"files": [{"path": "a.dat", "size": 1 << 60, "sha256": "0" * 64}]},
    {"files": [{"path": "aptrun.sig", "size": 1, "sha256": "0" * 64}]},
    {"name": "../../x"},
    {"format_version": 99},
])
def test_pull_refuses_a_hostile_manifest(small_store, tmp_path, change):
    import hashlib

    run, store = small_store
    raw = json.loads((run / "aptrun.json").read_text())
    raw.update(change)
    data = json.dumps(raw).encode()
    digest = hashlib.sha256(data).hexdigest()  # the hash matches by construction
    (store / layout.manifest(digest)).parent.mkdir(parents=True, exist_ok=True)
    (store / layout.manifest(digest)).write_bytes(data)
    (store / "refs/run1").write_text(digest)
    _refused(store, tmp_path / "dest")
    outside = tmp_path / "evil"
    assert not outside.exists()


def test_pull_refuses_a_ref_that_is_not_a_digest_or_names_another_manifest(small_store, tmp_path):
    run, store = small_store
    (store / "refs/run1").write_text("../../../etc/passwd")
    _refused(store, tmp_path / "d1", msg="is not a ref")
    (store / "refs/run1").write_text("ab" * 32)
    _refused(store, tmp_path / "d2", msg="missing")
    other = random_run(tmp_path / "o/run2", {"x": b"x"})
    push(other, store)
    (store / "refs/run1").write_text(load_manifest(other).digest())
    _refused(store, tmp_path / "d3", msg="not 'run1'")
    r = cli("pull", store, "../run1", "-C", tmp_path / "d4")
    assert r.exit_code == 1 and no_traceback(r.stderr)


# -- signatures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    for k in ("alice", "mallory"):
        r = cli("keygen", d / k, "--json")
        assert r.exit_code == 0 and (d / k).stat().st_mode & 0o777 == 0o600
    return d


def test_signed_push_pull_and_trust(small_store, keys, tmp_path):
    run, store = small_store
    digest = load_manifest(run).digest()
    _refused(store, tmp_path / "d0", "--trust", keys / "alice.pub", msg="not signed")
    pushed(run, store, "--sign", keys / "alice")
    r = cli("pull", store, "run1", "-C", tmp_path / "ok", "--trust", keys / "mallory.pub", "--trust",
            keys / "alice.pub", "--json", "-q")
    assert r.exit_code == 0 and json.loads(r.stdout)["signed_by"]
    assert cli("verify", tmp_path / "ok/run1", "--trust", keys / "alice.pub").exit_code == 0
    _refused(store, tmp_path / "d1", "--trust", keys / "mallory.pub", msg="--trust does not name")
    sig = store / layout.signature(digest)
    sig.write_bytes(sign("run1", digest, keys / "mallory"))  # re-signed by another key
    _refused(store, tmp_path / "d2", "--trust", keys / "alice.pub", msg="--trust does not name")
    sig.write_bytes(sign("run1", "f" * 64, keys / "alice"))  # alice's signature of another state
    _refused(store, tmp_path / "d3", "--trust", keys / "alice.pub", msg="changed after it was signed")
    sig.write_bytes(b"{not json")
    _refused(store, tmp_path / "d4", "--trust", keys / "alice.pub", msg="not an aptbundle signature")


def test_signed_archive_unpacks_with_trust_and_with_plain_tar(tiny_run, keys, tmp_path):
    arc = tmp_path / "run1.aptrun.tar.zst"
    assert cli("pack", tiny_run, "-o", arc, "--sign", keys / "alice", "-q").exit_code == 0
    assert cli("verify", arc, "--trust", keys / "alice.pub").exit_code == 0
    r = cli("verify", arc, "--trust", keys / "mallory.pub")
    assert r.exit_code == 1 and "does not name" in r.stderr
    r = cli("unpack", arc, "-C", tmp_path / "bad", "--trust", keys / "mallory.pub")
    assert r.exit_code == 1 and not (tmp_path / "bad").exists() and no_traceback(r.stderr)
    assert cli("unpack", arc, "-C", tmp_path / "ok", "--trust", keys / "alice.pub", "-q").exit_code == 0
    assert (tmp_path / "ok/run1/aptrun.sig").is_file()
    assert cli("verify", tmp_path / "ok/run1", "--trust", keys / "alice.pub").exit_code == 0
    unsigned = tmp_path / "plain.aptrun.tar.zst"
    assert cli("pack", tiny_run, "-o", unsigned, "-q").exit_code == 0
    r = cli("unpack", unsigned, "-C", tmp_path / "u", "--trust", keys / "alice.pub")
    assert r.exit_code == 1 and "not signed" in r.stderr and not (tmp_path / "u").exists()
    if shutil.which("tar") and shutil.which("zstd"):
        (tmp_path / "tar").mkdir()
        subprocess.run(["tar", "--zstd", "-xf", arc, "-C", tmp_path / "tar"], check=True)
        same_files(tiny_run, tmp_path / "tar/run1")
    else:
        import zstandard

        with zstandard.open(arc, "rb") as z, tarfile.open(fileobj=z, mode="r|") as t:
            assert "run1/aptrun.sig" in [m.name for m in t]


def test_pull_scans_what_it_fetches_and_push_refuses_to_store_a_payload(small_store, tmp_path):
    import hashlib
    import pickle


    run, store = small_store
    marker = tmp_path / "PWNED"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = pickle.dumps({"state": Boom()}, protocol=2)
    (run / "optimizer.pt").write_bytes(evil)
    raw = json.loads((run / "aptrun.json").read_text())
    raw["files"] = sorted(raw["files"] + [{"path": "optimizer.pt", "size": len(evil),
                                           "sha256": hashlib.sha256(evil).hexdigest()}], key=lambda f: f["path"])
    (run / "aptrun.json").write_text(json.dumps(raw))
    r = cli("push", run, tmp_path / "store2")
    assert r.exit_code == 1 and "optimizer.pt" in r.stderr and no_traceback(r.output)
    assert not (tmp_path / "store2/refs").exists()  # nothing listed
    from aptbundle.store.recipes import Part, Recipe

    sha = hashlib.sha256(evil).hexdigest()
    blob = store / layout.recipe(sha)  # a stranger's pusher stores it anyway
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(Recipe(len(evil), sha, (Part("file", len(evil), inline=evil),)).to_bytes())
    data = json.dumps(raw).encode()
    from aptbundle.format.manifest import parse_manifest

    digest = parse_manifest(data).digest()
    (store / layout.manifest(digest)).parent.mkdir(parents=True, exist_ok=True)
    (store / layout.manifest(digest)).write_bytes(data)
    (store / "refs/run1").write_text(digest)
    err = _refused(store, tmp_path / "dest", msg="optimizer.pt")
    assert "system" in err and not marker.exists()


def test_a_mangled_signature_is_a_clean_refusal_never_a_crash(keys, tmp_path):
    """Whatever bytes stand in aptrun.sig, --trust refuses them with a SignatureError."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from aptbundle.format.signature import check, load_public_key
    from aptbundle.ground.errors import SignatureError

    good = json.loads(sign("run1", "a" * 64, keys / "alice"))
    trusted = [load_public_key(keys / "alice.pub")]
    values = st.one_of(st.none(), st.integers(), st.text(max_size=40), st.binary(max_size=40).map(lambda b: b.hex()),
                       st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                            max_size=2))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(key=st.sampled_from(["payloadType", "payload", "signatures", "extra"]), value=values,
           raw=st.binary(max_size=200))
    def round_(key, value, raw):
        env = dict(good)
        env[key] = value
        for data in (json.dumps(env).encode(), raw):
            try:
                check(data, "run1", "a" * 64, trusted, "run1")
            except SignatureError:
                pass
            else:  # accepted: only an envelope whose signed parts are the original ones
                assert data != raw or raw == json.dumps(good).encode()
                assert key == "extra" or env[key] == good[key]

    round_()

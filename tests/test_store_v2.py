"""Store version 2: objects per tensor, deltas between checkpoints, one checkpoint at a time,
history and retention, check, the compare-and-swap ref, version 1 read and upgraded.

Runs are Hugging Face Trainer folders of real safetensors files whose float tensors drift a
little from checkpoint to checkpoint (as weights do late in training), adopted and pushed as a
user does; the CLI as typed; SIGKILL where the promise is about being killed.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard
from safetensors.numpy import save_file

from aptbundle.format.manifest import load_manifest
from aptbundle.layouts.adopt import adopt, update
from aptbundle.store import layout
from aptbundle.store.backend import Store
from aptbundle.store.maintain import gc, log
from aptbundle.store.pull import pull
from aptbundle.store.push import push
from aptbundle.store.reader import ObjectReader
from aptbundle.store.recipes import Part, Recipe
from conftest import APTBUNDLE, cli, no_traceback

SHAPES = {"wte": (256, 64), "h0.w": (64, 192), "h1.w": (64, 192), "ln.b": (64,)}


def tensors(step: int, frozen: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The model at ``step``: each tensor its start plus a small drift per step (frozen ones stay)."""
    out = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        rng = np.random.default_rng(i)
        start = rng.standard_normal(shape).astype(np.float32) * 0.02
        direction = np.random.default_rng(1000 + i).standard_normal(shape).astype(np.float32) * 1e-6
        out[name] = start if name in frozen else start + direction * step
    return out


def checkpoint(run: Path, step: int, frozen: tuple[str, ...] = ()) -> None:
    ck = run / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    save_file(tensors(step, frozen), str(ck / "model.safetensors"))
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": step / 60, "max_steps": 60,
                                                       "log_history": [{"step": step, "loss": 1.0 / step}],
                                                       "best_metric": None, "best_model_checkpoint": None}))
    (update if (run / "aptrun.json").exists() else adopt)(run)


def store_size(store: Path) -> int:
    return sum(p.stat().st_size for p in store.rglob("*") if p.is_file())


def same_files(a: Path, b: Path, man=None) -> None:
    for f in (man or load_manifest(b)).files:
        assert (b / f.path).read_bytes() == (a / f.path).read_bytes(), f.path


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A run of six checkpoints, pushed after each; the store and each version's digest."""
    base = tmp_path_factory.mktemp("grown")
    run, store = base / "run1", base / "store"
    digests, results = [], []
    for step in range(10, 70, 10):
        checkpoint(run, step)
        results.append(push(run, store))
        digests.append(results[-1].digest)
    return run, store, digests, results


def test_later_checkpoints_are_deltas_and_pull_back_exactly(grown, tmp_path):
    run, store, _digests, results = grown
    from aptbundle.store.objects import MAX_CHAIN

    # deltas on deltas up to MAX_CHAIN, then a full object again (the fifth push after the first)
    assert [r.delta_objects for r in results] == [0] + [3] * MAX_CHAIN + [0] * (5 - MAX_CHAIN)
    assert results[-1].parent == results[-2].digest
    r = cli("pull", store, "run1", "-C", tmp_path, "--json", "-q")
    assert r.exit_code == 0, r.stderr
    same_files(run, tmp_path / "run1")
    assert cli("verify", tmp_path / "run1").exit_code == 0


def test_unchanged_tensors_inside_a_changed_file_are_stored_once(tmp_path):
    run, store = tmp_path / "run1", tmp_path / "store"
    frozen = ("wte", "h0.w")
    checkpoint(run, 10, frozen)
    push(run, store)
    before = store_size(store)
    checkpoint(run, 20, frozen)
    res = push(run, store)
    changed = sum(int(np.prod(SHAPES[n])) * 4 for n in SHAPES if n not in frozen)
    grew = store_size(store) - before
    assert res.present_objects == len(frozen) and res.sent_objects == 1  # h1.w; ln.b is small: in the recipe
    assert grew < changed + 16_000, (grew, changed)  # the changed tensors, a recipe, a manifest, a ref
    pull(store, "run1", tmp_path / "out")
    same_files(run, tmp_path / "out/run1")


def test_pull_latest_fetches_only_that_checkpoint_and_is_a_run_of_its_own(grown, tmp_path):
    run, store, _d, _r = grown
    r = cli("pull", store, "run1", "-C", tmp_path, "--checkpoints", "latest", "--json", "-q")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    man = load_manifest(tmp_path / "run1")
    assert [c.name for c in man.checkpoints] == ["checkpoint-60"] == res["checkpoints"]
    assert all(f.path.startswith("checkpoint-60/") for f in man.files)
    # the latest checkpoint's objects, and the bases its deltas need: never the whole run's
    reader = ObjectReader(Store(store))
    latest = [f for f in load_manifest(run).files if f.path.startswith("checkpoint-60/")]
    needed = {o for f in latest for o in reader.recipe(f.sha256, f.size).objects()}
    everything = {p.name for p in (store / "objects").rglob("*") if p.is_file()}
    assert res["fetched_objects"] <= len(needed) < len(everything)
    assert res["fetched_bytes"] == sum(f.size for f in latest)
    same_files(run, tmp_path / "run1", man)
    assert cli("verify", tmp_path / "run1").exit_code == 0
    r = cli("pull", store, "run1", "-C", tmp_path / "named", "--checkpoints", "checkpoint-30", "-q")
    assert r.exit_code == 0 and [c.name for c in load_manifest(tmp_path / "named/run1").checkpoints] == ["checkpoint-30"]
    r = cli("pull", store, "run1", "-C", tmp_path / "none", "--checkpoints", "checkpoint-99")
    assert r.exit_code == 1 and "checkpoint-99" in r.stderr and no_traceback(r.output)
    assert not (tmp_path / "none/run1").exists()


def test_log_lists_every_version_and_forget_dry_run_changes_nothing(grown):
    _run, store, digests, _r = grown
    r = cli("log", store, "run1", "--json")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)["versions"]
    assert [x["digest"] for x in rows] == digests
    assert [x["step"] for x in rows] == [10, 20, 30, 40, 50, 60] and not any(x["fork"] for x in rows)
    assert [len(x["checkpoints"]) for x in rows] == [1, 2, 3, 4, 5, 6]
    text = cli("log", store, "run1").stdout
    assert digests[0][:12] in text and "checkpoint-60" in text
    r = cli("forget", store, "run1", "--keep-last", "2", "--dry-run", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["forgotten"] == digests[:4]
    assert [x["digest"] for x in log(store, "run1")] == digests


def test_a_delta_chain_pulls_back_exactly_after_forget_and_gc(tmp_path):
    run, store = tmp_path / "run1", tmp_path / "store"
    for step in range(10, 70, 10):
        checkpoint(run, step)
        push(run, store)
    old = time.time() - 7200
    for p in store.rglob("*"):
        os.utime(p, (old, old))
    r = cli("forget", store, "run1", "--keep-last", "1", "--json")
    assert r.exit_code == 0 and len(json.loads(r.stdout)["forgotten"]) == 5
    res = gc(store, grace_s=0)
    assert res.deleted_manifests == 5 and res.deleted_recipes == 0  # the kept version lists every checkpoint
    r = cli("check", store, "--read-data", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"], r.stdout
    pull(store, "run1", tmp_path / "out")
    same_files(run, tmp_path / "out/run1")
    # the last checkpoint alone now: every other goes, and the deltas' bases stay
    for p in run.glob("checkpoint-[1-5]0"):
        import shutil

        shutil.rmtree(p)
    update(run)
    push(run, store)
    for p in store.rglob("*"):
        os.utime(p, (old, old))
    assert cli("forget", store, "run1", "--keep-last", "1").exit_code == 0
    assert gc(store, grace_s=0).deleted_recipes >= 5
    assert cli("check", store, "--read-data").exit_code == 0
    pull(store, "run1", tmp_path / "out2")
    same_files(run, tmp_path / "out2/run1")


def test_check_names_a_damaged_object_and_the_next_push_repairs_it(tmp_path):
    run, store = tmp_path / "run1", tmp_path / "store"
    checkpoint(run, 10)
    push(run, store)
    assert cli("check", store).exit_code == 0
    weights = next(f for f in load_manifest(run).files if f.path.endswith(".safetensors"))
    part = max((p for p in ObjectReader(Store(store)).recipe(weights.sha256, weights.size).parts if p.sha256),
               key=lambda p: p.size)
    obj = store / layout.object(part.sha256)
    obj.write_bytes(obj.read_bytes()[:-64] + bytes(64))
    r = cli("check", store)  # presence only: the object is there
    assert r.exit_code == 0
    r = cli("check", store, "--read-data")
    assert r.exit_code == 1 and part.sha256 in r.stdout and "run1" in r.stdout and no_traceback(r.output)
    assert "damaged" in r.stdout and not obj.exists()  # removed, with the recipe that needs it
    assert cli("pull", store, "run1", "-C", tmp_path / "bad").exit_code == 1
    res = push(run, store)  # the next push of the run sends it again
    assert res.sent_files == 1 and res.sent_objects >= 1
    assert cli("check", store, "--read-data").exit_code == 0
    pull(store, "run1", tmp_path / "out")
    same_files(run, tmp_path / "out/run1")


def _v1_store(run: Path, store: Path) -> None:
    """A store as aptbundle 0.3 wrote it (version 1): a zstd blob per file, the manifest, a ref of one digest."""
    man = load_manifest(run)
    for f in man.files:
        p = store / "blobs/sha256" / f.sha256[:2] / f.sha256
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(zstandard.ZstdCompressor().compress((run / f.path).read_bytes()))
    m = store / layout.manifest(man.digest())
    m.parent.mkdir(parents=True)
    m.write_bytes(man.to_bytes())
    (store / "refs").mkdir()
    (store / "refs/run1").write_text(man.digest() + "\n")


def test_a_version_1_store_is_read_and_upgraded(tmp_path):
    run, store = tmp_path / "run1", tmp_path / "store"
    checkpoint(run, 10)
    checkpoint(run, 20)
    _v1_store(run, store)
    r = cli("ls", store, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["runs"][0]["missing_blobs"] == 0
    assert cli("pull", store, "run1", "-C", tmp_path / "v1", "-q").exit_code == 0
    same_files(run, tmp_path / "v1/run1")
    r = cli("push", run, store)
    assert r.exit_code == 1 and "store upgrade" in r.stderr and no_traceback(r.output)
    r = cli("store", "upgrade", store, "--json", "-q")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["runs"] == 1 and (store / "format").read_bytes() == b"aptstore 2\n"
    assert not any(p.is_file() for p in (store / "blobs").rglob("*"))
    assert cli("check", store, "--read-data").exit_code == 0
    assert cli("pull", store, "run1", "-C", tmp_path / "v2", "-q").exit_code == 0
    same_files(run, tmp_path / "v2/run1")
    assert "already version 2" in cli("store", "upgrade", store).stdout


def test_file_modes_travel_through_a_store(tmp_path):
    run, store = tmp_path / "run1", tmp_path / "store"
    checkpoint(run, 10)
    script = run / "train.sh"
    script.write_text("#!/bin/sh\necho train\n")
    script.chmod(0o755)
    update(run)
    push(run, store)
    pull(store, "run1", tmp_path / "out")
    assert (tmp_path / "out/run1/train.sh").stat().st_mode & 0o777 == 0o755
    weights = "checkpoint-10/model.safetensors"
    assert (tmp_path / "out/run1" / weights).stat().st_mode & 0o777 == (run / weights).stat().st_mode & 0o777


# -- hostile recipes -----------------------------------------------------------------------------
def _recipe_store(tmp_path: Path):
    run, store = tmp_path / "run1", tmp_path / "store"
    checkpoint(run, 10)
    checkpoint(run, 20)
    push(run, store)
    return run, store, [f for f in load_manifest(run).files if f.path.endswith(".safetensors")]


def _forge(store: Path, f, parts) -> None:
    (store / layout.recipe(f.sha256)).write_bytes(Recipe(f.size, f.sha256, tuple(parts)).to_bytes())


def _delta_object(base: str, size: int, body: bytes) -> bytes:
    from aptbundle.store.objects import Header, marker

    planes = np.frombuffer(body, dtype=np.uint8).reshape(-1, 4).T
    return marker(Header("x4", size, base, 1)) + b"".join(
        zstandard.ZstdCompressor(write_content_size=True).compress(p.tobytes()) for p in planes)


@pytest.mark.parametrize("how", ["short", "long", "names_itself", "base_missing", "base_other_size", "self_base",
                                 "not_a_recipe", "inline_lies"])
def test_hostile_recipes_are_refused_cleanly(tmp_path, how):
    run, store, (w10, w20) = _recipe_store(tmp_path)
    reader = ObjectReader(Store(store))
    parts = list(reader.recipe(w20.sha256, w20.size).parts)
    big = max(range(len(parts)), key=lambda i: parts[i].size)
    p = parts[big]
    if how == "short":
        _forge(store, w20, parts[:-1])
    elif how == "long":
        _forge(store, w20, parts + [Part("more", 8, inline=b"12345678")])
    elif how == "names_itself":
        parts[big] = Part(p.name, p.size, w20.sha256)
        _forge(store, w20, parts)
    elif how == "inline_lies":  # three bytes inline, where the part says the whole file
        body = {"format": "aptrecipe", "version": 1, "size": w20.size, "sha256": w20.sha256,
                "parts": [{"name": "x", "size": w20.size, "inline": "eHh4"}]}
        (store / layout.recipe(w20.sha256)).write_bytes(zstandard.ZstdCompressor().compress(json.dumps(body).encode()))
    elif how == "not_a_recipe":
        (store / layout.recipe(w20.sha256)).write_bytes(b"\x00" * 100)
    else:  # a delta object whose base is missing, of another size, or itself
        data = (run / w20.path).read_bytes()
        offset = sum(q.size for q in parts[:big])
        body = data[offset:offset + p.size]
        base = {"base_missing": "ab" * 32, "base_other_size": next(q.sha256 for q in parts if q.sha256 and
                                                                   q.size != p.size and q.size % 4 == 0),
                "self_base": p.sha256}[how]
        (store / layout.object(p.sha256)).write_bytes(_delta_object(base, p.size, body))
    dest = tmp_path / "dest"
    r = cli("pull", store, "run1", "-C", dest)
    assert r.exit_code == 1 and no_traceback(r.output), r.output
    assert w20.path in r.stderr or "recipe" in r.stderr or "object" in r.stderr, r.stderr
    assert not dest.exists() or not any(dest.iterdir())
    r = cli("check", store, "--read-data", "--no-repair")
    assert r.exit_code == 1 and no_traceback(r.output) and "run1" in r.stdout, r.output


# -- crashes and concurrency -----------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_during_push_and_during_gc_leaves_a_store_that_check_passes(tmp_path):
    run, store = tmp_path / "run1", tmp_path / "store"
    for step in range(10, 40, 10):
        checkpoint(run, step)
    t0 = time.monotonic()
    subprocess.run([*APTBUNDLE, "push", run, tmp_path / "timing", "-q"], check=True)
    full = time.monotonic() - t0
    rng = random.Random(22)
    for i in range(4):
        p = subprocess.Popen([*APTBUNDLE, "push", run, store, "-q"], stderr=subprocess.DEVNULL)
        time.sleep(full * rng.uniform(0.3, 1.1))
        p.send_signal(signal.SIGKILL)
        p.wait()
        r = cli("check", store, "--read-data") if (store / "refs").exists() else None
        assert r is None or r.exit_code == 0, r.stdout
    push(run, store)
    for step in range(40, 70, 10):
        checkpoint(run, step)
        push(run, store)
    assert cli("forget", store, "run1", "--keep-last", "1").exit_code == 0
    old = time.time() - 7200
    for p in store.rglob("*"):
        os.utime(p, (old, old))
    for i in range(3):
        g = subprocess.Popen([*APTBUNDLE, "gc", store, "--grace", "0"], stdout=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.4, 1.2))
        g.send_signal(signal.SIGKILL)
        g.wait()
        r = cli("check", store, "--read-data")
        assert r.exit_code == 0, r.stdout
    pull(store, "run1", tmp_path / "out")
    same_files(run, tmp_path / "out/run1")


def _push_at_barrier(run: str, store: str, barrier) -> str:
    return push(run, store, before_ref=lambda: barrier.wait(60)).digest


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_pushes_of_one_run_at_once_both_stay_in_the_log(tmp_path, request, where):
    a, b = tmp_path / "a/run1", tmp_path / "b/run1"
    if where == "s3":
        request.getfixturevalue("s3")
    store = tmp_path / "store" if where == "local" else f"s3://runs/race-{os.getpid()}-{time.time_ns()}"
    checkpoint(a, 10)
    push(a, store)
    import shutil

    shutil.copytree(a, b)  # the run moved to a second machine, and both carry on
    checkpoint(a, 20)
    checkpoint(b, 30)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as m:
        barrier = m.Barrier(2)
        with ctx.Pool(2) as pool:
            jobs = [pool.apply_async(_push_at_barrier, (str(r), str(store), barrier)) for r in (a, b)]
            digests = [j.get(120) for j in jobs]
    rows = log(store, "run1")
    assert {r["digest"] for r in rows[1:]} == set(digests) and len(rows) == 3
    assert sum(r["fork"] for r in rows) == 1  # both were pushed on top of the first version
    for run, digest in zip((a, b), digests):
        out = tmp_path / "out" / digest[:8]
        pull(store, "run1", out, digest=digest)
        same_files(run, out / "run1")


def test_a_push_asks_only_about_what_it_sends(tmp_path):
    """Push never lists the store's objects or recipes: its cost does not grow with the store."""
    run, store = tmp_path / "run1", tmp_path / "store"
    checkpoint(run, 10)
    push(run, store)
    for i in range(300):  # other runs' objects
        d = hashlib.sha256(str(i).encode()).hexdigest()
        p = store / layout.object(d)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    checkpoint(run, 20)
    listed = []
    from aptbundle.store.backend import LocalBackend

    real = LocalBackend.list
    LocalBackend.list = lambda self, prefix: listed.append(prefix) or real(self, prefix)
    try:
        push(run, store)
    finally:
        LocalBackend.list = real
    assert not [p for p in listed if p.startswith((layout.OBJECTS, layout.RECIPES, layout.BLOBS))], listed


def test_a_dcp_checkpoint_is_an_object_per_tensor_item(tmp_path):
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    run, store = tmp_path / "run1", tmp_path / "store"
    torch.manual_seed(0)
    state = {"frozen": torch.randn(256, 64), "trained": torch.randn(256, 64)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one process, no process group: DCP says so
        dcp.save(state, checkpoint_id=str(run / "step-10"))
        adopt(run)
        push(run, store)
        state["trained"] += 1e-4
        dcp.save(state, checkpoint_id=str(run / "step-20"))
    update(run)
    before = store_size(store)
    res = push(run, store)
    frozen = hashlib.sha256(state["frozen"].numpy().tobytes()).hexdigest()
    assert (store / layout.object(frozen)).is_file()  # the frozen tensor's item, stored once
    assert res.present_objects >= 1 and res.delta_objects == 1  # the trained one, a delta
    assert store_size(store) - before < state["frozen"].numel() * 4  # a new .distcp, less than one tensor
    pull(store, "run1", tmp_path / "out")
    same_files(run, tmp_path / "out/run1")


def test_a_crafted_distcp_is_cut_in_one_pass_and_refused_by_the_scan(tmp_path):
    """Zip headers that promise streamed entries and never end them: cut in one linear pass (the
    parts cover the file exactly), and the scan refuses the file before any push."""
    from aptbundle.store.recipes import cuts

    run = tmp_path / "run1"
    head = b"PK\x03\x04" + b"\x00\x00\x08\x00\x00\x00" + b"\x00" * 16 + b"\x0a\x00\x00\x00" + b"a/data/0xx"
    f = run / "step-1/__0_0.distcp"
    f.parent.mkdir(parents=True)
    f.write_bytes(head * 50_000 + (head + b"PK\x07\x08" + b"\x01" * 20) * 50_000)
    parts = cuts(f, "step-1/__0_0.distcp", f.stat().st_size)
    assert sum(c.size for c in parts) == f.stat().st_size
    assert all(a.offset + a.size == b.offset for a, b in zip(parts, parts[1:]))
    r = cli("init", run)
    assert r.exit_code == 1 and "__0_0.distcp" in r.stderr and no_traceback(r.output)

"""Moving a run never loses the user's data, and a store can hurt no one outside it.

Pull (and `resume --from`) replaces an existing DEST/NAME only when it is the same run, an
ancestor of what comes in, and holds nothing its manifest does not list; otherwise it refuses,
or with --force moves the old copy aside. A store whose folders are links, or which holds a FIFO
where an object belongs, is refused by every command at once, and nothing outside it is read,
written or deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from aptbundle.format.manifest import load_manifest
from aptbundle.format.run import Run
from aptbundle.ground.lock import is_lock_name
from conftest import cli, no_traceback, trainer
from test_store import pushed, random_run, same_files


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``root`` with its bytes and mode, links by their target (aptbundle's own
    lock files, made when a run is opened for writing, left out)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if is_lock_name(p.name):
            continue
        if p.is_symlink():
            out[rel] = (os.readlink(p).encode(), -1)
        elif p.is_file():
            out[rel] = (p.read_bytes(), p.stat().st_mode)
    return out


@pytest.fixture
def small_push(tmp_path):
    """A run pushed into a local store: (run, store)."""
    run = random_run(tmp_path / "src" / "run1", {"config.json": b'{"a": 1}', "weights.dat": 3000, "notes.txt": 200})
    store = tmp_path / "store"
    pushed(run, store)
    return run, store


def test_pull_never_replaces_another_run_of_the_same_name_and_force_moves_it_aside(small_push, tmp_path):
    run, store = small_push
    theirs = random_run(tmp_path / "dest" / "run1", {"mine.txt": 500, "checkpoints/step-1/model.dat": 800}, seed=7)
    before = snapshot(theirs)
    r = cli("pull", store, "run1", "-C", tmp_path / "dest")
    assert r.exit_code == 1 and no_traceback(r.output), r.output
    assert "another run" in r.stderr and "--force" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert snapshot(theirs) == before  # byte for byte what it was
    r = cli("pull", store, "run1", "-C", tmp_path / "dest", "--force", "--json", "-q")
    assert r.exit_code == 0, r.output
    aside = Path(json.loads(r.stdout)["moved_aside"])
    assert aside.parent == tmp_path / "dest" and aside.name.startswith("run1.old-")
    assert snapshot(aside) == before  # moved, not deleted
    same_files(run, tmp_path / "dest" / "run1")


def test_pull_refuses_a_folder_that_is_not_a_run_and_force_keeps_it(small_push, tmp_path):
    _run, store = small_push
    (tmp_path / "dest" / "run1").mkdir(parents=True)
    (tmp_path / "dest" / "run1" / "thesis.tex").write_text("years of work")
    r = cli("pull", store, "run1", "-C", tmp_path / "dest")
    assert r.exit_code == 1 and "not a run" in r.stderr and no_traceback(r.output)
    assert (tmp_path / "dest" / "run1" / "thesis.tex").read_text() == "years of work"
    assert cli("pull", store, "run1", "-C", tmp_path / "dest", "--force", "-q").exit_code == 0
    kept = [p for p in (tmp_path / "dest").iterdir() if p.name.startswith("run1.old-")]
    assert len(kept) == 1 and (kept[0] / "thesis.tex").read_text() == "years of work"


def test_a_user_file_the_ignore_rules_hide_survives_a_pull(tmp_path):
    src = random_run(tmp_path / "src" / "run1", {".aptignore": b"results.csv\n", "weights.dat": 2000})
    store = tmp_path / "store"
    pushed(src, store)
    assert cli("pull", store, "run1", "-C", tmp_path / "dest", "-q").exit_code == 0
    dest = tmp_path / "dest" / "run1"
    (dest / "results.csv").write_text("step,acc\n1,0.9\n")  # the user's, hidden by the run's own .aptignore
    (dest / ".ipynb_checkpoints").mkdir()
    (dest / ".ipynb_checkpoints" / "nb-checkpoint.ipynb").write_text("{}")  # hidden by the built-in rules
    (src / "more.dat").write_bytes(b"x" * 100)  # a newer version in the store
    assert cli("init", "--update", src, "-q").exit_code == 0
    pushed(src, store)
    before = snapshot(dest)
    r = cli("pull", store, "run1", "-C", tmp_path / "dest")
    assert r.exit_code == 1 and no_traceback(r.output), r.output
    assert "results.csv" in r.stderr and ".ipynb_checkpoints/nb-checkpoint.ipynb" in r.stderr, r.stderr
    assert snapshot(dest) == before
    # without them the same pull updates the older copy in place, as before
    (dest / "results.csv").unlink()
    shutil.rmtree(dest / ".ipynb_checkpoints")
    assert cli("pull", store, "run1", "-C", tmp_path / "dest", "-q").exit_code == 0
    same_files(src, dest)


def test_resume_from_a_store_refuses_a_newer_state_on_disk_and_deletes_nothing(tmp_path):
    run_dir, store = tmp_path / "machine" / "r", tmp_path / "store"
    assert trainer("--run-dir", run_dir, "--stop-at-step", "4", "--save-every", "2", "-q").returncode == 0
    pushed(run_dir, store)  # the last backup
    assert trainer("--run-dir", run_dir, "--resume-from", "latest", "--stop-at-step", "8", "--save-every", "2",
                   "-q").returncode == 0  # machine A trained on; the store did not see it
    newer = [c.name for c in load_manifest(run_dir).checkpoints if c.step > 4]
    assert newer
    before = snapshot(run_dir)
    r = cli("resume", "--from", f"{store}/r", "-C", run_dir.parent, "-q")
    assert r.exit_code == 1 and no_traceback(r.output), r.output
    assert all(n in r.stderr for n in newer) and "--force" in r.stderr, r.stderr
    assert snapshot(run_dir) == before and Run.open(run_dir).latest.step == 8


def test_pull_updates_an_ancestor_copy_in_place(tmp_path):
    run_dir, store = tmp_path / "a" / "r", tmp_path / "store"
    assert trainer("--run-dir", run_dir, "--stop-at-step", "2", "--save-every", "2", "-q").returncode == 0
    pushed(run_dir, store)
    assert cli("pull", store, "r", "-C", tmp_path / "b", "-q").exit_code == 0
    assert trainer("--run-dir", run_dir, "--resume-from", "latest", "--stop-at-step", "4", "--save-every", "2",
                   "-q").returncode == 0
    pushed(run_dir, store)
    r = cli("pull", store, "r", "-C", tmp_path / "b", "--json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["reused_files"] > 0 and json.loads(r.stdout)["moved_aside"] is None
    same_files(run_dir, tmp_path / "b" / "r")


def _store_commands(store: Path, run: Path, dest: Path) -> list[tuple[str, ...]]:
    return [("push", run, store), ("pull", store, "run1", "-C", dest), ("ls", store), ("gc", store, "--grace", "0")]


@pytest.mark.parametrize("top", ["blobs", "locks", "refs", "manifests"])
def test_a_store_whose_top_folder_is_a_link_is_refused_and_nothing_outside_is_touched(small_push, tmp_path, top):
    run, store = small_push
    victim = tmp_path / "project" / top
    victim.parent.mkdir()
    if (store / top).exists():
        shutil.move(store / top, victim)
    else:
        victim.mkdir()
    (victim / "precious.json").write_text('{"kind": "push", "time": 0}')  # what a careless walker would delete
    (store / top).symlink_to(victim, target_is_directory=True)
    before = snapshot(victim.parent)
    for args in _store_commands(store, run, tmp_path / "dest"):
        r = cli(*args)
        assert r.exit_code == 1 and no_traceback(r.output), (args, r.output)
        assert "symbolic link" in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
        assert snapshot(victim.parent) == before, args
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("where", ["ref", "recipe", "lock", "manifest"])
def test_a_fifo_in_a_store_is_refused_by_every_command_at_once(small_push, tmp_path, where):
    run, store = small_push
    man = load_manifest(run)
    from aptbundle.store import layout

    key = {"ref": layout.ref("run1"), "recipe": layout.recipe(man.files[-1].sha256),
           "manifest": layout.manifest(man.digest()),
           "lock": layout.lock("push", "elsewhere", 4242, "0123456789ab")}[where]
    path = store / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    for args in _store_commands(store, run, tmp_path / "dest"):
        t0 = time.monotonic()
        r = cli(*args)
        assert r.exit_code == 1 and no_traceback(r.output), (args, r.output)
        assert "FIFO" in r.stderr, (args, r.stderr)
        assert time.monotonic() - t0 < 5, args
    assert not (tmp_path / "dest").exists()


def test_store_keys_stay_inside_the_store():
    from aptbundle.ground.errors import StoreError
    from aptbundle.store import layout

    for bad in ("../x", "blobs/../../etc", "/etc/passwd", "blobs//x", "elsewhere/x", "refs/a\\b"):
        with pytest.raises(StoreError):
            layout.parts(bad)
    for name in ("..", "a/b", "", "CON"):
        with pytest.raises(StoreError):
            layout.ref(name)
    with pytest.raises(StoreError):
        layout.blob("../" * 20 + "x" * 4)

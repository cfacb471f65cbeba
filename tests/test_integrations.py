"""Protect a run while it trains: the framework callbacks push each checkpoint in the background,
a pre-emption saves and pushes before the process goes, and `restore` carries on elsewhere,
byte-identically. Real libraries, tiny models from configs, the training script as a process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from aptbundle.format.manifest import parse_manifest
from aptbundle.store import layout, refs
from conftest import PY, ROOT

pytest.importorskip("transformers")
SCRIPT = ROOT / "tests" / "protected_hf.py"


def start(out: Path, store: Path, delay: float = 0.0, script: Path = SCRIPT) -> subprocess.Popen:
    env = dict(os.environ, APTBUNDLE_TEST_STEP_DELAY=str(delay), PYTHONPATH=str(ROOT))
    return subprocess.Popen([PY, str(script), str(out), str(store)], cwd=out.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def group_gone(pgid: int) -> bool:
    """No process is left in the process group (the script and the backups' process)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def pushed_checkpoints(store: Path, name: str = "run") -> list[str]:
    ref = store / layout.ref(name)
    if not ref.is_file():
        return []
    digest = refs.parse_ref(ref.read_bytes(), str(ref))[-1].digest
    m = store / layout.manifest(digest)
    return [c.name for c in parse_manifest(m.read_bytes()).checkpoints] if m.is_file() else []


def wait_until(pred, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def kill_then_carry_on(tmp_path: Path, store, pushed, wanted: str, script: Path = SCRIPT) -> Path:
    """Train on machine A until ``wanted`` is in the store (``pushed()`` lists what is), SIGKILL it,
    delete machine A, and run the same script on machine B; machine B's run folder."""
    first = tmp_path / "machine-a"
    first.mkdir()
    p = start(first / "run", store, delay=0.1, script=script)
    try:
        wait_until(lambda: wanted in pushed() or p.poll() is not None, 240)
        assert p.poll() is None, p.communicate()[1]
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        wait_until(lambda: group_gone(p.pid), 10)  # the backups' process went with it
    finally:
        p.kill()
    shutil.rmtree(first)  # the first machine is gone, and its working directory with it
    second = tmp_path / "machine-b"
    second.mkdir()
    p = start(second / "run", store, script=script)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return second / "run"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> bytes:
    base = tmp_path_factory.mktemp("whole")
    (base / "run").mkdir()
    p = start(base / "run", base / "store")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "checkpoint-40" in pushed_checkpoints(base / "store")  # pushed while it trained, and at the end
    return (base / "run" / "final" / "model.safetensors").read_bytes()


# (the tests that share the uninterrupted run go to one worker: it is trained once)
@pytest.mark.xdist_group("hf-uninterrupted")
# SIGKILL against a local store too with APTBUNDLE_LONG=1 (the default run kills with SIGKILL against S3, below)
@pytest.mark.parametrize("how", ["SIGTERM", *(["SIGKILL"] if os.environ.get("APTBUNDLE_LONG") else [])])
def test_a_killed_hugging_face_run_carries_on_elsewhere_byte_identically(uninterrupted, tmp_path, how):
    store = tmp_path / "store"
    first = tmp_path / "machine-a"
    first.mkdir()
    p = start(first / "run", store, delay=0.1)
    try:
        wait_until(lambda: "checkpoint-20" in pushed_checkpoints(store) or p.poll() is not None, 240)
        assert p.poll() is None, p.communicate()[1]
        os.killpg(p.pid, getattr(signal, how))  # to the whole group, as a scheduler does
        _, err = p.communicate(timeout=120)
        wait_until(lambda: group_gone(p.pid), 10)
    finally:
        p.kill()
    if how == "SIGTERM":
        assert p.returncode == 143, err
        saved = pushed_checkpoints(store)
        newest = max(saved, key=lambda n: int(n.split("-")[1]))
        assert int(newest.split("-")[1]) > 20, saved  # the checkpoint saved at the signal reached the store
        assert (first / "run" / newest).is_dir()
    shutil.rmtree(first)  # the first machine is gone, and its working directory with it
    second = tmp_path / "machine-b"
    second.mkdir()
    p = start(second / "run", store)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert (second / "run" / "final" / "model.safetensors").read_bytes() == uninterrupted


def test_a_killed_accelerate_run_carries_on_elsewhere_exactly(tmp_path):
    import torch

    script = ROOT / "tests" / "protected_acc.py"
    whole = tmp_path / "whole"
    whole.mkdir()
    p = start(whole / "run", tmp_path / "store-whole", script=script)
    assert p.wait(timeout=300) == 0, p.communicate()[1]
    store = tmp_path / "store"
    second = kill_then_carry_on(tmp_path, store, lambda: pushed_checkpoints(store), "checkpoint_1", script)
    a, b = torch.load(whole / "run" / "final.pt"), torch.load(second / "final.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lightning_restore_continues_from_the_newest_pushed_checkpoint(tmp_path):
    pytest.importorskip("lightning")
    import torch

    import frameworks as fw
    from aptbundle.integrations.lightning import AptbundleCallback, restore

    store = tmp_path / "store"
    first = tmp_path / "a" / "run"
    fw.lightning_fit(first, steps=20, callbacks=[AptbundleCallback(store)])
    assert "epoch-2-step-20" in pushed_checkpoints(store), pushed_checkpoints(store)
    second = tmp_path / "b" / "run"
    path = restore(store, "run", second)
    assert path is not None and path.endswith("step=20.ckpt") and Path(path).is_file()
    _, resumed = fw.lightning_fit(second, ckpt_path=Path(path), steps=40)
    _, in_place = fw.lightning_fit(tmp_path / "c" / "run", ckpt_path=first / "checkpoints" / "epoch=2-step=20.ckpt",
                                   steps=40)
    for (k, a), (_, b) in zip(resumed.state_dict().items(), in_place.state_dict().items()):
        assert torch.equal(a, b), k
    assert restore(store, "other", tmp_path / "d" / "other") is None  # nothing there: start fresh


def test_a_checkpoint_half_written_is_never_pushed(tmp_path):
    """The Trainer is held mid-save (weights written, optimizer not yet) while the previous save's
    push runs: every version the store holds lists complete checkpoints only."""
    import time as _time

    from transformers import Trainer

    import frameworks as fw
    from aptbundle.integrations.transformers import AptbundleCallback

    class SlowSave(Trainer):
        def _save_optimizer_and_scheduler(self, output_dir):
            _time.sleep(0.6)  # the folder holds weights and no optimizer for a while
            return super()._save_optimizer_and_scheduler(output_dir)

    store = tmp_path / "store"
    import transformers

    transformers.Trainer, saved = SlowSave, transformers.Trainer  # what fw.hf_trainer imports
    try:
        fw.hf_trainer(tmp_path / "run", steps=30, callbacks=[AptbundleCallback(store)])
    finally:
        transformers.Trainer = saved
    versions = list((store / "manifests").rglob("*"))
    manifests = [parse_manifest(p.read_bytes()) for p in versions if p.is_file() and not p.name.endswith((".sig", ".modes"))]
    assert manifests
    for man in manifests:
        for c in man.checkpoints:
            names = {f.path.rsplit("/", 1)[-1] for f in man.files_of(c)}
            assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= names, (c.name, names)


@pytest.mark.xdist_group("hf-uninterrupted")
def test_a_killed_hugging_face_run_carries_on_from_the_loopback_s3_store(uninterrupted, s3, tmp_path):
    store = "s3://runs/protected"
    fs, _ = s3

    def pushed() -> list[str]:
        try:
            digest = refs.parse_ref(fs.cat_file(f"runs/protected/{layout.ref('run')}"), "ref")[-1].digest
            fs.invalidate_cache()
            return [c.name for c in parse_manifest(fs.cat_file(f"runs/protected/{layout.manifest(digest)}")).checkpoints]
        except (FileNotFoundError, OSError):
            return []

    second = kill_then_carry_on(tmp_path, store, pushed, "checkpoint-20")
    assert (second / "final" / "model.safetensors").read_bytes() == uninterrupted


def _backup_processes() -> list[int]:
    """This process's children that run backups (``store.worker``)."""
    found = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if b"aptbundle.store.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the backups' process through /proc")
def test_backups_carry_on_in_the_training_process_when_their_process_dies(tmp_path, capfd):
    from aptbundle.integrations.live import LiveBackup

    out, store = tmp_path / "run", tmp_path / "store"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "weights.dat").write_bytes(os.urandom(200_000))
    backup = LiveBackup(store, out)
    backup.saved()
    wait_until(lambda: backup.last is not None, 60)
    (child,) = _backup_processes()
    os.kill(child, signal.SIGKILL)  # the backups' process is lost (out of memory, say)
    os.waitpid(child, 0)
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "weights.dat").write_bytes(os.urandom(200_000))
    backup.saved()
    result = backup.close()
    err = capfd.readouterr().err
    assert "backups run in the training process from now on" in err and "Traceback" not in err, err
    assert backup.failures == 0 and result is not None
    digest = refs.parse_ref((store / layout.ref("run")).read_bytes(), "ref")[-1].digest
    assert digest == result.digest
    files = {f.path for f in parse_manifest((store / layout.manifest(digest)).read_bytes()).files}
    assert {"checkpoint-1/weights.dat", "checkpoint-2/weights.dat"} <= files, files
    assert _backup_processes() == []


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="the share is counted through /proc")
def test_backups_keep_to_their_share_of_the_cpu_and_the_final_push_runs_free(tmp_path, monkeypatch):
    """While something takes every core (here: spinning processes as low in priority as the
    backups', so that only the bound holds the backup back), the backups' process is held to its
    share of the CPU; the last push (the end of training, a pre-emption) is not: with a share so
    small that a push would take hours, close() still pushes the newest state at once."""
    from aptbundle.integrations.live import LiveBackup

    monkeypatch.setenv("APTBUNDLE_BACKUP_CPU_SHARE", "0.0001")
    out, store = tmp_path / "run", tmp_path / "store"
    out.mkdir()
    (out / "a.dat").write_bytes(os.urandom(2_000_000))
    spin = "import os\nos.nice(19)\nwhile True:\n    pass"
    spinners = [subprocess.Popen([PY, "-c", spin]) for _ in range(len(os.sched_getaffinity(0)))]
    try:
        backup = LiveBackup(store, out)
        backup.saved()
        time.sleep(1.5)
        assert backup.last is None and not (store / layout.ref("run")).exists()  # held back
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    (out / "b.dat").write_bytes(os.urandom(300_000))
    backup.saved()
    began = time.monotonic()
    result = backup.close()
    assert time.monotonic() - began < 60 and result is not None and backup.failures == 0
    assert refs.parse_ref((store / layout.ref("run")).read_bytes(), "ref")[-1].digest == result.digest
    files = {f.path for f in parse_manifest((store / layout.manifest(result.digest)).read_bytes()).files}
    assert {"a.dat", "b.dat"} <= files, files

"""Shared helpers: the CLI as a user types it, and small real runs made on the fly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from aptbundle.commands.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
os.environ.setdefault("APTBUNDLE_STORE_BACKOFF", "0.02")  # the fault tests fail many calls on purpose
os.environ.setdefault("APTBUNDLE_STORE_ATTEMPTS", "3")
# backups while training are held to 1 % of the CPU (store.worker): the tests that kill a run
# once a backup landed want it to land soon (the bound has a test of its own)
os.environ.setdefault("APTBUNDLE_BACKUP_CPU_SHARE", "1")
collect_ignore = ["fixtures", "protected_hf.py", "protected_acc.py"]  # folders other frameworks wrote; scripts run as processes

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: each trains with one thread (its subprocesses too, so
    # runs compared bit for bit use the same thread count), instead of two workers fighting over
    # both cores with two threads each
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    import torch

    torch.set_num_threads(1)


def cli(*args: str, cwd: str | Path | None = None):
    """Run ``aptbundle ARGS`` through click's runner (stderr kept apart)."""
    runner = CliRunner()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        return runner.invoke(cli_main, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


def sh(*args: str, cwd: str | Path | None = None, env: dict | None = None, check: bool = False,
       timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command in a subprocess, as a user would in a shell."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=full_env, capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def trainer(*args: str, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run the trainer's command line as typed, in this process (torch is already imported here,
    which saves a second and a half per call); returns what ``sh`` returns."""
    from apt_model.training.trainer import main as trainer_main

    runner = CliRunner()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        r = runner.invoke(trainer_main, [str(a) for a in args])
    finally:
        os.chdir(old)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


PY = sys.executable
# Rounds of the random-kill tests: a few by default, so the suite stays near 3 minutes; set
# APTBUNDLE_KILL_ROUNDS=25 (and select them with `-m slow`) for the long randomised round.
KILL_ROUNDS = int(os.environ.get("APTBUNDLE_KILL_ROUNDS", "2"))
APTBUNDLE = [PY, "-m", "aptbundle"]
TRAINER = [PY, "-m", "apt_model.training.trainer"]


def no_traceback(text: str) -> bool:
    return "Traceback" not in text


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A real tiny APT run, trained 2 epochs with a mid-epoch checkpoint (read-only for tests)."""
    from apt_model.training.trainer import train

    base = tmp_path_factory.mktemp("tiny")
    old = os.getcwd()
    os.chdir(base)
    try:
        train(run_dir=base / "run1", model_size="tiny", epochs=2, save_every=10, keep_last=10, quiet=True)
    finally:
        os.chdir(old)
    return base / "run1"


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run that a test may damage."""
    import shutil

    dst = tmp_path / "run1"
    shutil.copytree(tiny_run, dst)
    return dst


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server on loopback (moto), with a bucket ``runs``: ``(s3fs filesystem, env)``."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec.config

    fsspec.config.set_conf_env(fsspec.config.conf)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"])
    fs.mkdir("runs")
    try:
        yield fs, env
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        fsspec.config.conf.pop("s3", None)

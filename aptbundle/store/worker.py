"""Backup pushes in a process of their own, so that training never waits for them.

A push is CPU work (hashing, scanning, cutting, compressing) and a good deal of Python. Run in a
thread of the training process it competes with the training thread for the interpreter lock as
well as for the cores: on a two-core machine, backups from a thread stalled a Hugging Face Trainer
by 4-12 % (``bench/bench_integrations.py``). ``PushWorker`` runs each push in a child process at
the lowest priority (nice 19) instead: it holds no lock the training process needs, and runs on
the CPU time training leaves. Where it would still compete (a core it runs on shares caches and
memory with training), ``CPU_SHARE`` bounds what it takes while training runs.
After training, nothing competes with it and the final push runs at full speed.

The child is this module run by the same interpreter. It reads one job a line (JSON) on its stdin
and answers one line on its own copy of stdout (stray prints go to stderr). It ignores SIGINT and
SIGTERM, which a terminal or a scheduler sends to the whole process group: the training process
decides when backups stop, and a pre-emption waits for the final push. It dies with its parent
(a SIGKILL to the trainer ends its pushes too, as a thread's would end; a push is crash-safe).

If the child cannot start, or dies, the jobs run in the calling thread instead (at the lowest
priority of that thread), after one warning; ``APTBUNDLE_BACKUP_IN_PROCESS=1`` asks for that from
the start (where a training process may not start others).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from aptbundle.ground.ahead import idle
from aptbundle.ground.errors import AptBundleError
from aptbundle.store.push import PushResult, push


# While training runs, the backups' process uses at most this share of the machine's CPU time (of
# all its cores together): the parent stops it (SIGSTOP) whenever it got ahead, and lets it go on
# (SIGCONT) when training has caught up. nice 19 alone keeps it off the cores training wants, but
# not out of what it shares with training on a core training leaves (caches, memory): on two
# cores, an unbounded backup cost a Trainer 3-5 % of its step time. What it uses while the machine
# has a core and a half or more to spare (a GPU machine, whose training thread mostly waits for the
# device) is not counted: there it takes from no one, and runs free. Where training takes the
# cores, the store lags and training does not pay. The final push (hurry) runs free.
# APTBUNDLE_BACKUP_CPU_SHARE overrides the share (1 for no bound).
CPU_SHARE = 0.01


class PushFailed(AptBundleError):
    """A push the worker ran failed; the message is its one-line reason."""


def failure_reason(e: BaseException) -> str:
    """One line for a warning: the message of an error of ours or of the system, else the type too."""
    text = str(e).splitlines()[0][:300] if str(e) else ""
    return text if isinstance(e, (AptBundleError, OSError)) and text else f"{type(e).__name__}: {text}"


def run_job(job: dict, known: dict) -> dict:
    """Do one job, here: ``{"kind": "push", "path", "store", "sign", "threads"}`` pushes a run;
    ``"backup"`` first describes the folder ``path`` (a view of a framework's output folder) as
    run ``name`` with id ``run_id`` (by default the one ``origin``'s manifest or the store
    records), then pushes it. ``known`` remembers the files hashed before, across jobs."""
    path, store, run_id = Path(job["path"]), job["store"], job.get("run_id")
    if job["kind"] == "backup":
        from aptbundle.layouts.adopt import adopt

        if run_id is None:
            run_id = _known_run_id(Path(job["origin"]), store, job["name"])
        run_id = adopt(path, name=job["name"], run_id=run_id, known=known).manifest.run_id
    res = push(path, store, sign=job.get("sign"), threads=job.get("threads", 1), level=1)
    return {"result": asdict(res), "run_id": run_id}


def answer_of(job: dict, known: dict) -> dict:
    """``run_job``'s answer, or ``{"error": reason}``."""
    try:
        return run_job(job, known)
    except Exception as e:  # every failure is an answer; the caller warns
        return {"error": failure_reason(e)}


def _share() -> float:
    raw = os.environ.get("APTBUNDLE_BACKUP_CPU_SHARE")
    try:
        value = float(raw) if raw else CPU_SHARE
    except ValueError:
        value = CPU_SHARE
    return value if 0 < value <= 1 else CPU_SHARE


def _cpu_clock(stat_file: str) -> Callable[[], float] | None:
    """CPU seconds used so far, as Linux counts them: a process's (``/proc/PID/stat``, all its
    threads) or the whole machine's (``/proc/stat``, every core, idle and I/O wait left out);
    None where there is no such count."""
    stat = Path(stat_file)
    try:
        tick = os.sysconf("SC_CLK_TCK")
        stat.read_bytes()
    except (OSError, ValueError, AttributeError):
        return None
    if stat_file == "/proc/stat":
        def clock() -> float:
            f = [int(x) for x in stat.read_bytes().split(b"\n", 1)[0].split()[1:9]]
            return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / tick  # user nice system irq softirq steal
    else:
        def clock() -> float:
            f = stat.read_bytes().rsplit(b")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / tick  # utime stime

    return clock


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _known_run_id(origin: Path, store: str, name: str) -> str | None:
    """A framework folder's run id: the one its folder records (a restored run), else the store's."""
    from aptbundle.format.manifest import load_manifest
    from aptbundle.store.backend import Store
    from aptbundle.store.pull import resolve

    try:
        return load_manifest(origin).run_id
    except AptBundleError:
        pass
    try:
        return resolve(Store.existing(store), name)[2].run_id
    except (AptBundleError, OSError):
        return None


class PushWorker:
    """The parent's side: ``run(job)`` hands a job to the child and waits for its answer (call it
    from one background thread at a time); ``close()`` lets the child go."""

    def __init__(self, warn: Callable[[str], None]):
        self.warn = warn
        self._proc: subprocess.Popen | None = None
        self._here = os.environ.get("APTBUNDLE_BACKUP_IN_PROCESS") == "1"  # jobs run here: asked for, or no child
        self._known: dict = {}  # the files hashed here, when jobs run here
        self._lock = threading.Lock()
        self._hurry = threading.Event()

    def start(self) -> None:
        """Start the child (at once, so that its start-up overlaps training; call this on the
        thread that lives longest, the training thread: the child dies with that thread)."""
        with self._lock:
            if self._proc is not None or self._here:
                return
            package = str(Path(__file__).resolve().parents[2])
            boot = f"import sys; sys.path.insert(0, {package!r}); from aptbundle.store.worker import main; main()"
            main = threading.current_thread() is threading.main_thread()
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-c", boot, str(os.getpid()), "pdeathsig" if main else "poll"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, close_fds=True)
            except (OSError, ValueError) as e:
                self._give_up(f"cannot start a process for the backups ({failure_reason(e)})")
                return
            try:
                os.setpriority(os.PRIO_PROCESS, self._proc.pid, 19)  # before the child's imports
            except (AttributeError, OSError):
                pass

    def run(self, job: dict) -> dict:
        """The job's answer (``{"result": PushResult fields, "run_id"}``); raises PushFailed."""
        self.start()
        answer = self._answer(job)
        if "error" in answer:
            raise PushFailed(answer["error"])
        return answer

    def hurry(self) -> None:
        """No more bound on the CPU share: the pushes from now on are the last (the end of
        training, a pre-emption)."""
        self._hurry.set()

    def _answer(self, job: dict) -> dict:
        proc = self._proc
        if proc is not None and not self._here:
            try:
                proc.stdin.write(json.dumps({**_absolute(job), "fsspec": _fsspec_settings()}) + "\n")
                proc.stdin.flush()
                line = self._read_answer(proc)
            except (OSError, ValueError):
                line = ""
            if line:
                return json.loads(line)
            code = proc.poll()
            self._give_up(f"the backup process ended (exit {code if code is not None else 'unknown'})")
        idle(threading.get_native_id())
        return answer_of(job, self._known)

    def _read_answer(self, proc: subprocess.Popen) -> str:
        """The child's answer line, the child held to its share of the CPU meanwhile: whenever
        its CPU time, less what it used while the machine had a core and a half or more to spare (then
        it takes from no one), is ahead of its share of the time gone by, it is stopped."""
        cores = _cores()
        share = _share() * cores
        child, machine = _cpu_clock(f"/proc/{proc.pid}/stat"), _cpu_clock("/proc/stat")
        if child is None or machine is None or share >= cores:
            return proc.stdout.readline()
        import select

        began = last = time.monotonic()
        began_cpu = last_child = child()
        last_busy, spared = machine(), 0.0
        try:
            while True:
                if select.select([proc.stdout], [], [], 0.05)[0]:
                    return proc.stdout.readline()
                if self._hurry.is_set():
                    continue
                now, used, busy = time.monotonic(), child(), machine()
                others = max(0.0, (busy - last_busy) - (used - last_child)) / max(now - last, 1e-3)
                if cores - others >= 1.5:
                    spared += used - last_child
                last, last_child, last_busy = now, used, busy
                ahead = (used - began_cpu - spared) / share - (now - began)
                if ahead > 0.05:
                    os.kill(proc.pid, signal.SIGSTOP)
                    try:
                        self._hurry.wait(min(ahead, 1.0))
                    finally:
                        os.kill(proc.pid, signal.SIGCONT)
        except (OSError, ValueError):  # the child is gone: what it said, if anything
            return proc.stdout.readline()

    def _give_up(self, why: str) -> None:
        self._here = True
        self.warn(f"warning: {why}; backups run in the training process from now on")

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        try:  # said, not an end of input: a process forked from this one may hold the pipe open
            proc.stdin.write('{"kind": "exit"}\n')
            proc.stdin.close()
        except (OSError, ValueError):
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _absolute(job: dict) -> dict:
    """The job with its paths made absolute here: the child keeps the folder it started in, and
    this process may have changed its own since."""
    out = dict(job)
    for key in ("path", "origin", "sign"):
        if out.get(key):
            out[key] = os.path.abspath(out[key])
    if "://" not in out["store"]:
        out["store"] = os.path.abspath(out["store"])
    return out


def _fsspec_settings() -> dict | None:
    """fsspec's configuration as this process has it (a script may set the store's endpoint in
    ``fsspec.config.conf``), for the child to use the same; None where it cannot travel."""
    config = sys.modules.get("fsspec.config")
    if config is None:
        return None
    try:
        return json.loads(json.dumps(config.conf))
    except (TypeError, ValueError):
        return None


def _use_fsspec_settings(conf: dict | None) -> None:
    if conf is None:
        return
    import fsspec.config

    if fsspec.config.conf != conf:
        fsspec.config.conf.clear()
        fsspec.config.conf.update(conf)


def result_of(answer: dict) -> PushResult:
    return PushResult(**answer["result"])


def lowest_priority() -> None:
    """This process (its threads to come) at nice 19: it runs on the CPU time training leaves,
    and still gets a little when something takes every core, so a backup keeps moving (at
    SCHED_IDLE, a machine kept busy by anything else would starve it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    except (AttributeError, OSError):
        pass


# -- the child -------------------------------------------------------------------------------------
def main() -> None:
    parent, how = int(sys.argv[1]), sys.argv[2]
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the parent decides when backups stop
    _die_with(parent, how == "pdeathsig")
    lowest_priority()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed goes to stderr, not into the answers
    sys.stdout = sys.stderr
    known: dict = {}
    for line in sys.stdin:
        job = json.loads(line)
        if job.get("kind") == "exit":
            return
        _use_fsspec_settings(job.pop("fsspec", None))
        out.write(json.dumps(answer_of(job, known)) + "\n")
        out.flush()


def _die_with(parent: int, pdeathsig: bool) -> None:
    """End this process when the parent ends: at once where Linux can say so (the parent's
    thread that started it, its main thread, ends with it), else within a fifth of a second."""
    if pdeathsig and sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="aptbundle-parent-watch", daemon=True).start()

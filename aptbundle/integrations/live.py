"""Backups of a run that another framework is writing, and the way back: what the callbacks share.

``LiveBackup(store, output_dir)`` is told (``saved()``) each time the framework has finished
writing a checkpoint. On the training thread it only takes a view of the folder as it is now:
hard links of its files in a private folder inside it (milliseconds; the framework may rotate
old checkpoints the next moment, the links keep them). A background thread (one, at low
priority) then has that view described as a run (the layouts of ``init``: checkpoints, best,
curves; files hashed and scanned once, then remembered by inode) and pushed, by a process of its
own (``store.worker``: it never holds the training process's interpreter lock), and drops it. One
push is in flight at a time; views taken meanwhile are folded into the newest. A store that
fails is a warning, never a stop of training: the next save tries again, and ``close()`` (the
end of training, or a pre-emption) makes the final push and waits for it.

``restore(store, name, output_dir)`` is the way back: it pulls the run's newest version into
``output_dir`` (verified, incrementally, under the materializer's rules, so newer local state is
never overwritten) and returns the path to hand to the framework's own resume, or None when the
store has no such run, so the same script starts fresh on the first machine and carries on on
the next. Nothing here imports a framework.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from aptbundle.format.manifest import MANIFEST_NAME
from aptbundle.format.run import Run, walk_files
from aptbundle.ground import temporaries
from aptbundle.ground.ahead import join_worker
from aptbundle.ground.errors import MaterializeError
from aptbundle.ground.lock import is_lock_name
from aptbundle.ground.paths import check_name
from aptbundle.ground.temporaries import remove_path
from aptbundle.layouts import detect
from aptbundle.store.push import PushResult
from aptbundle.store.worker import PushWorker, failure_reason, result_of

VIEW = "backup-view"  # the label of the views' temporary folders


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class LiveBackup:
    """Pushes of one framework's output folder to one store, at most one in flight."""

    def __init__(self, store: str | Path, output_dir: str | Path, *, name: str | None = None,
                 sign: str | Path | None = None, warn: Callable[[str], None] | None = None, threads: int = 1):
        self.store, self.output_dir = str(store), Path(output_dir)
        self.name = check_name(name or self.output_dir.resolve().name)
        self.sign, self.warn, self.threads = sign, warn or _warn, threads
        self.run_id: str | None = None
        self.last: PushResult | None = None
        self.failures = 0
        self._worker = PushWorker(self.warn)  # where the pushes run
        self._lock = threading.Condition()
        self._pending: Path | None = None  # the newest view not pushed yet
        self._thread: threading.Thread | None = None
        self._busy = False

    # -- the training thread -------------------------------------------------------------------
    def saved(self) -> None:
        """The framework finished writing a checkpoint: take a view of the folder and hand it to
        the background push (returns at once)."""
        view = self._view()
        if view is None:
            return
        self._worker.start()  # here: the child lives as long as this (the training) thread
        with self._lock:
            older, self._pending = self._pending, view
            if older is not None:
                remove_path(older)  # folded into the newer one
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="aptbundle-backup", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def close(self) -> PushResult | None:
        """Wait for the pushes owed, the newest view last; the last push's result."""
        self._worker.hurry()  # the last pushes run free of the bound on their CPU share
        join_worker(self._lock, lambda: self._thread)
        with self._lock:  # a view left by a worker that died: push it here
            view, self._pending = self._pending, None
        if view is not None:
            self._push(view)
        self._worker.close()
        return self.last

    def _view(self) -> Path | None:
        root = self.output_dir
        try:
            files, _problems = walk_files(root)  # what cannot travel (links out, FIFOs) is left to the push to name
            temporaries.clean_stale(root, VIEW)
            view = temporaries.temp_path(root, VIEW)
            view.mkdir()
            for rel in files:
                if rel == MANIFEST_NAME or is_lock_name(rel.rsplit("/", 1)[-1]):
                    continue
                dst = view / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(root / rel, dst, follow_symlinks=False)
                except FileNotFoundError:
                    pass  # rotated away since the walk
            return view
        except OSError as e:
            self.warn(f"warning: backup of {root}: cannot take a view of the folder ({e}); training goes on")
            return None

    # -- the background thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                view, self._pending = self._pending, None
                if view is None:
                    self._thread = None  # said under the lock: a save from now on starts another
                    return
            self._push(view)

    def _push(self, view: Path) -> None:
        try:
            answer = self._worker.run({
                "kind": "backup", "path": str(view), "origin": str(self.output_dir), "store": self.store,
                "name": self.name, "run_id": self.run_id, "sign": str(self.sign) if self.sign else None,
                "threads": self.threads})
            self.run_id, self.last = answer["run_id"], result_of(answer)
        except Exception as e:  # a failing store, or one that answers with something unforeseen
            self.failures += 1
            self.warn(f"warning: backup of {self.output_dir} to {self.store} failed ({failure_reason(e)}); training"
                      " goes on, the next save tries again")
        finally:
            remove_path(view)


class Protection:
    """What a framework's callback holds: the store, the run's name, the signing key, the backup
    (made on the main process only, when training starts) and the pre-emption."""

    def __init__(self, store: str | Path, *, name: str | None = None, sign: str | Path | None = None):
        self.store, self.name, self.sign = store, name, sign
        self.backup: LiveBackup | None = None
        self.preemption = Preemption()

    def start(self, output_dir: str | Path, main: bool) -> None:
        if main:
            self.backup = LiveBackup(self.store, output_dir, name=self.name, sign=self.sign)
        self.preemption.install()

    def finish(self) -> None:
        """The final push, waited for; then 128 + the signal, if one asked training to stop."""
        self.preemption.uninstall()
        if self.backup is not None:
            self.backup.saved()  # the state at the end (a stop between saves left nothing newer)
            self.backup.close()
        self.preemption.exit_if_requested()


class Preemption:
    """SIGTERM and SIGINT, as a request to save at the end of the step and stop (the callbacks
    ask their framework for that); the exit status is 128 + the signal once the final push is in."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:  # asked twice: stop now, as the default would
            self.uninstall()
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.signum = signum

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def exit_if_requested(self) -> None:
        """Leave with 128 + the signal if one came (after the caller's final push)."""
        if self.signum is not None:
            raise SystemExit(128 + self.signum)


def restore(store: str | Path, name: str, output_dir: str | Path, *, trust: list[str | Path] | None = None,
            pick: Callable[[Run], str | None] | None = None) -> str | None:
    """Pull run ``name`` out of ``store`` into ``output_dir`` and return the path the framework
    resumes from (``pick`` chooses it from the pulled run; by default its latest checkpoint), or
    None when the store has no such run. Safe to call on every rank of one machine: one pulls,
    the others wait for it and find the run in place."""
    from aptbundle.store import layout
    from aptbundle.store.backend import Store
    from aptbundle.store.pull import pull

    out = Path(output_dir)
    if out.resolve().name != check_name(name):
        raise MaterializeError(f"{out}: restore puts run {name!r} into a folder of that name; pass an output_dir"
                               f" named {name!r}, or name={out.resolve().name!r} to the callback")
    st = Store(store)
    if not (st.remote or Path(st.url).is_dir()) or not st.exists(layout.ref(name)):
        return None  # no such store or run yet: the first machine starts fresh
    out.parent.mkdir(parents=True, exist_ok=True)
    import portalocker

    with portalocker.Lock(str(out.parent / f".aptrun-restore-{name}.lock"), timeout=3600):
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a folder the framework made before the restore: nothing in it to keep
        try:
            pull(store, name, out.parent, trust=trust)
        except MaterializeError as e:
            if not getattr(e, "newer_copy", False):
                raise
            _warn(f"note: {out} holds a newer state of {name} than {store}; carrying on from it")
    run = Run.open(out) if Run.is_run(out) else None
    if run is None:
        return None
    if pick is not None:
        return pick(run)
    files, _problems = walk_files(run.path)  # what is on disk: the pulled run, or a newer local one
    found = detect(run.path, files)
    latest = found.checkpoints[-1] if found and found.checkpoints else None
    return str(run.path / latest.folder) if latest else None

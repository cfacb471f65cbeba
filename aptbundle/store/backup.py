"""Backups while training: push the run after each checkpoint commit, in the background.

``Backup(run_dir, store)`` is handed to the trainer's checkpointer as ``on_commit``. Each commit
asks for a push; one push runs at a time in a thread of its own, and commits that arrive while
it runs are folded into one more push when it ends, so the training thread never waits for the
network and never queues up work. The push itself runs in a process of its own
(``store.worker``), so it never holds the training process's interpreter lock. A failed push is reported as a warning and retried at the
next commit: a store that is briefly unreachable does not stop training. ``close()`` waits for
the push in flight and makes a final one, so the store ends up holding the last checkpoint
(the trainer calls it at the end and on SIGTERM). If the machine is lost, the store still holds
the last pushed checkpoint: ``aptbundle resume --from STORE/NAME`` continues from it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from aptbundle.ground.ahead import join_worker
from aptbundle.ground.errors import StoreError
from aptbundle.store.push import PushResult
from aptbundle.store.worker import PushWorker, failure_reason, result_of


def split_ref(text: str) -> tuple[str, str]:
    """``STORE/NAME`` -> ``(STORE, NAME)``: the last path component names the run."""
    text = str(text).rstrip("/")
    store, sep, name = text.rpartition("/")
    if not sep or not name or not store or store.endswith(":/"):
        raise StoreError(f"{text!r}: expected STORE/NAME, a store folder or URL and a run name"
                         " (for example backups/run1 or s3://bucket/runs/run1)")
    return store, name


class Backup:
    """Pushes of one run to one store, at most one in flight."""

    def __init__(self, run_dir: str | Path, store: str, *, sign: str | Path | None = None, dense: bool = False,
                 warn: Callable[[str], None] | None = None, threads: int = 1):
        self.run_dir, self.store, self.sign, self.dense = Path(run_dir), store, sign, dense
        self.warn = warn or (lambda msg: None)
        self.threads = threads  # zstd workers: leave the other cores to training
        self._lock = threading.Lock()
        self._wanted = False
        self._thread: threading.Thread | None = None
        self._worker = PushWorker(self.warn)

    def __call__(self, *_args) -> None:
        """Ask for a push (the checkpointer calls this after each commit); returns at once."""
        self._worker.start()  # here: the child lives as long as this (the training) thread
        with self._lock:
            self._wanted = True
            if self._thread is not None and self._thread.is_alive():
                return  # it takes this request (it clears _thread under the lock before it ends)
            self._thread = threading.Thread(target=self._run, name="aptbundle-backup", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._wanted:
                    self._thread = None  # said under the lock: a commit from now on starts another
                    return
                self._wanted = False
            self._push_once()

    def _push_once(self) -> PushResult | None:
        try:
            return result_of(self._worker.run({"kind": "push", "path": str(self.run_dir), "store": self.store,
                                                "sign": str(self.sign) if self.sign else None,
                                               "threads": self.threads}))
        except Exception as e:  # whatever the store does, a backup never stops training
            self.warn(f"warning: backup to {self.store} failed ({failure_reason(e)}); training goes on, the next"
                      " checkpoint tries again")
            return None

    def wait(self) -> None:
        """Wait for the push in flight (and any it still owes) to end."""
        join_worker(self._lock, lambda: self._thread)

    def close(self) -> PushResult | None:
        """Wait for the push in flight, then push the run as it is now; the last push's result."""
        self._worker.hurry()  # the last pushes run free of the bound on their CPU share
        self.wait()
        with self._lock:
            self._wanted = False
        try:
            return self._push_once()
        finally:
            self._worker.close()

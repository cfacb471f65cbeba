"""How ``push`` and ``gc`` stay out of each other's way in a store that may be shared.

Object stores have no locks, so both write a small lock object first and read the others' after
(restic's scheme). A push that finds a live ``gc`` lock waits for it to finish before it asks
which objects the store already has; a gc that finds a live push lock steps back and waits for
it. Either the gc saw the push's lock (and waits), or the push saw the gc's (and waits), so a gc
never deletes an object a push is counting on. A lock whose process is gone (same host) or that was not refreshed for ``STALE_S`` seconds
is ignored and removed: a killed push never blocks a store for long.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, field

from aptbundle.ground.errors import StoreError, StoreLayoutError
from aptbundle.ground.values import finite_number
from aptbundle.ground.temporaries import pid_alive
from aptbundle.store import layout
from aptbundle.store.backend import Store

STALE_S = 15 * 60.0  # a lock not refreshed for this long belongs to a lost process
REFRESH_S = 60.0
GC_WAIT_S = 600.0  # how long a push waits for a gc to finish
MAX_LOCK_BYTES = 64 << 20
FUTURE_S = 300.0  # clocks of machines sharing a store may disagree by this much
_FIELD = rb'"[a-z]{1,16}": ("[^"\\\x00-\x1f]{0,256}"|-?[0-9][0-9.eE+-]{0,31}|NaN|-?Infinity|\[("[0-9a-f]{64}"(, "[0-9a-f]{64}")*)?\])'
_HELD: set[str] = set()  # the keys of the locks this process holds now (its threads' included)
_BODY = re.compile(rb"\{(" + _FIELD + rb"(, " + _FIELD + rb")*)?\}")  # what ``Lock.write`` writes


@dataclass
class Lock:
    """This process's lock object in a store."""

    store: Store
    kind: str  # "push" or "gc"
    keep: dict = field(default_factory=dict)  # for a push: {"blobs": [...], "manifests": [...]}
    key: str = ""
    written: float = 0.0

    def write(self) -> None:
        if not self.key:
            self.key = layout.lock(self.kind, socket.gethostname(), os.getpid(), secrets.token_hex(6))
        body = {"kind": self.kind, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), **self.keep}
        _HELD.add(self.key)
        self.store.put(self.key, json.dumps(body, sort_keys=True).encode(), count=False)
        self.written = time.monotonic()

    def refresh(self) -> None:
        """Rewrite the lock if it is getting old (call it between units of long work)."""
        if time.monotonic() - self.written > REFRESH_S:
            self.write()

    def release(self) -> None:
        if self.key:
            _HELD.discard(self.key)
            with contextlib.suppress(Exception):
                self.store.delete(self.key)


def others(store: Store, mine: Lock | None = None) -> list[dict]:
    """The live locks of other processes; stale ones are removed on the way."""
    live = []
    for key, _mtime, size in store.list(layout.LOCKS):
        if mine is not None and key == mine.key:
            continue
        if not layout.is_lock(key) or size > MAX_LOCK_BYTES:
            continue
        try:
            data = store.read(key, MAX_LOCK_BYTES)
            # the shape first, so a crafted body never costs more memory than its own size twice
            info = json.loads(data) if data is not None and _BODY.fullmatch(data) else None
        except StoreLayoutError:
            raise
        except (ValueError, StoreError):
            info = None
        if not isinstance(info, dict):  # half-written by an older tool, or garbage: not a lock
            continue
        why = _stale(info, key)
        if why:
            if why != "old":
                store.warnings.append(f"warning: {store.where(key)}: a lock {why}; taken as stale and removed")
            store.delete(key)
            continue
        info["key"] = key
        live.append(info)
    return live


def _stale(info: dict, key: str) -> str | None:
    """Why a lock no longer holds anything (None while it does): too old, its process gone (or it
    is this process, which no longer holds it: a delete that failed), or a time that no clock
    wrote (not a number, or in the future)."""
    t, pid, now = finite_number(info.get("time")), info.get("pid"), time.time()
    if info.get("host") == socket.gethostname() and pid == os.getpid() and key not in _HELD:
        return "old"
    if t is None:
        return "without a valid time"
    if t > now + FUTURE_S:
        return f"dated {t - now:.0f} s in the future"
    if now - t > STALE_S:
        return "old"
    if info.get("host") == socket.gethostname() and type(pid) is int and pid != os.getpid() \
            and 0 < pid < 1 << 31 and not pid_alive(pid):
        return "old"
    return None


@contextlib.contextmanager
def pushing(store: Store, blobs: list[str], manifest: str, wait_s: float = GC_WAIT_S):
    """Hold a push lock that protects ``blobs`` and ``manifest``; waits for a running gc first."""
    lock = Lock(store, "push", {"blobs": blobs, "manifests": [manifest]})
    lock.write()
    try:
        deadline = time.monotonic() + wait_s
        while gcs := [o for o in others(store, lock) if o.get("kind") == "gc"]:
            if time.monotonic() > deadline:
                who = gcs[0]
                raise StoreError(f"{store.url}: a gc (process {who.get('pid')} on {str(who.get('host'))[:64]}) has"
                                 f" been running for over {wait_s:.0f} s; push again when it is done")
            time.sleep(0.2)
            lock.refresh()
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def collecting(store: Store, wait_s: float = GC_WAIT_S):
    """Hold a gc lock while no push runs. A gc that finds a push steps back (releases its lock,
    so the push, which waits for gcs, can finish) and tries again, up to ``wait_s`` seconds: a
    push's objects are named by nothing until its recipes are written, so gc never runs beside
    one."""
    deadline = time.monotonic() + wait_s
    while True:
        lock = Lock(store, "gc")
        lock.write()
        live = others(store, lock)
        gcs = [o for o in live if o.get("kind") == "gc"]
        pushes = [o for o in live if o.get("kind") == "push"]
        if not gcs and not pushes:
            break
        lock.release()
        if gcs:
            info = gcs[0]
            raise StoreError(f"{store.url}: another gc is running (process {info.get('pid')} on"
                             f" {str(info.get('host'))[:64]}); one at a time")
        if time.monotonic() > deadline:
            info = pushes[0]
            raise StoreError(f"{store.url}: a push (process {info.get('pid')} on {str(info.get('host'))[:64]}) kept"
                             f" running for over {wait_s:.0f} s; gc again when pushes are done")
        time.sleep(0.2)
    try:
        yield lock
    finally:
        lock.release()

"""Work beside the main thread: bytes made a few blocks ahead of the reader, and idle threads.

``ReadAhead``: decompressing (zstd releases the GIL) or fetching over the network overlaps with
hashing, scanning and writing on another core. Errors in the thread are handed to the reader;
``close`` stops the thread even while it waits to hand out a block. ``idle(tid)`` puts a
background thread on the CPU time nothing else wants (a backup while training).
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable


class ReadAhead:
    """``read(n)`` over the blocks ``produce()`` returns (an empty block ends the stream)."""

    def __init__(self, produce: Callable[[], bytes], depth: int, name: str):
        self._produce = produce
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._cur, self._at, self._done = b"", 0, False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    b = self._produce()
                except BaseException as e:  # handed to the reading thread
                    b = e
                self._put(b)
                if not isinstance(b, (bytes, bytearray, memoryview)) or not b:
                    return
        finally:
            self._stop.set()

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (a whole block when ``n`` is negative); b"" at the end."""
        if self._at >= len(self._cur):
            if self._done:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if not item:
                self._done = True
                return b""
            self._cur, self._at = item, 0
        if self._at == 0 and (n is None or n < 0 or n >= len(self._cur)):
            self._at = len(self._cur)
            return self._cur
        b = self._cur[self._at:self._at + n]
        self._at += len(b)
        return b

    def unread(self, b: bytes) -> None:
        """Put back bytes just read (a peek at the head of the stream)."""
        self._cur, self._at = bytes(b) + bytes(self._cur[self._at:]), 0

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def idle(tid: int) -> None:
    """Give the thread ``tid`` the lowest priority a thread of a busy process should have (nice 19
    on Linux, where a thread is a task of its own): it runs on the CPU time training leaves, and
    still gets a little when training takes all of it. Not SCHED_IDLE: the thread shares the
    process's interpreter lock, and descheduled while holding it, it would hold up the training
    thread waiting for it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    except (AttributeError, OSError):
        pass


def join_worker(lock, current: Callable[[], threading.Thread | None]) -> None:
    """Wait until the worker thread that ``current()`` names (read under ``lock``) has ended,
    and any worker started in its place meanwhile."""
    while True:
        with lock:
            t = current()
        if t is None or not t.is_alive():
            return
        t.join()

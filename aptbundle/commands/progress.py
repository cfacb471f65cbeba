"""The one progress bar: on stderr, only when it is a terminal and ``--quiet`` is not given.

Byte counts for pack, unpack, verify and init; steps (with the loss as its label) for training.
Its total may be learnt late: the library calls ``set_total`` once it knows.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator

import click

from aptbundle.commands.render import human


class Bar:
    """A progress bar with percent and ETA; ``__call__(n)`` advances it by ``n``."""

    def __init__(self, label: str, total: int = 0, rate: bool = False):
        self.label, self.total, self.info, self.rate = label, total, "", rate
        self._bar = None
        self._done, self._t0 = 0, time.monotonic()

    def set_total(self, total: int) -> None:
        self.total = total

    def __call__(self, n: int, info: str | None = None) -> None:
        if info is not None:
            self.info = info
        self._done += n
        if self.rate:  # bytes so far and the mean rate: pushes and pulls are network-bound
            secs = max(time.monotonic() - self._t0, 1e-3)
            self.info = f"{human(self._done)} at {human(self._done / secs)}/s"
        if self._bar is None:
            self._bar = click.progressbar(length=max(self.total, 1), label=self.label, file=sys.stderr,
                                          show_pos=False, show_percent=True, show_eta=True,
                                          item_show_func=lambda _: self.info or None)
            self._bar.__enter__()
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def visible(quiet: bool) -> bool:
    """Whether a progress bar would be drawn."""
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def progress(label: str, quiet: bool, total: int = 0, rate: bool = False) -> Iterator[Bar | None]:
    """A progress bar, or None when ``--quiet`` is given or stderr is not a terminal. ``rate``
    shows the bytes done and the rate beside it."""
    if not visible(quiet):
        yield None
        return
    bar = Bar(label, total, rate)
    try:
        yield bar
    finally:
        bar.close()

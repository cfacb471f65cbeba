"""One rule for exit statuses, for every program of the project (``aptbundle``, the trainer,
``generate``):

====  =======================================================================
0     done
1     failed: one line per problem on stderr, never a traceback for a problem
      with the user's input or disk
2     misuse of flags (click's own)
3     not a failure: ``aptbundle resume`` of a run another framework wrote printed
      that framework's own resume call (on stdout) instead of training
130   stopped by SIGINT (Ctrl-C); 143 by SIGTERM, 129 by SIGHUP (128 + the
      signal), after saving or cleaning up
====  =======================================================================

SIGTERM and SIGHUP are turned into an exception, like Ctrl-C, so ``finally`` blocks run and a
command killed by ``timeout``, Slurm or a closed terminal leaves no temporaries behind. Messages
name the user's paths: aptbundle's temporary names are shown as what they stand for.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

import click

from aptbundle.commands.render import escaped
from aptbundle.ground.errors import AptBundleError, FrameworkRun, VerifyError
from aptbundle.ground.temporaries import plain_names

FAILED = 1
FOREIGN = 3  # resume printed another framework's call
SHOWN = 100  # problems printed one per line; the rest are counted


class Stopped(BaseException):
    """The process was asked to stop by a signal (SIGTERM, SIGHUP)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def status_for(signum: int) -> int:
    """The exit status of a command stopped by ``signum``: 128 + the signal, as shells report."""
    return 128 + signum


def plain(text: str) -> str:
    """``text`` with aptbundle's temporary names replaced by the names they stand for."""
    return plain_names(text)


def _say(text: str) -> None:
    click.echo(plain(escaped(text)), err=True)  # names in errors may come from a bundle: escaped


def report(error: BaseException) -> int:
    """Print ``error`` as the user should see it; return the exit status it means."""
    if isinstance(error, FrameworkRun):  # the normal outcome for a foreign run: its call, on stdout
        click.echo(plain(escaped(str(error))))
        return FOREIGN
    if isinstance(error, VerifyError):
        for p in error.problems[:SHOWN]:
            _say(f"error: {p}")
        if len(error.problems) > SHOWN:
            _say(f"error: ... and {len(error.problems) - SHOWN} more (--json lists every one)")
        _say(f"error: {error.what}: {len(error.problems)} problem(s)")
        if getattr(error, "hint", None):
            _say(f"hint: {error.hint}")
        return FAILED
    if isinstance(error, AptBundleError):
        _say(f"error: {error}")
        return FAILED
    if isinstance(error, OSError):  # disk full, permission denied: the user's environment, not a bug
        where = f"{error.filename}: " if getattr(error, "filename", None) else ""
        _say(f"error: {where}{error.strerror or error}; check the path, free space and permissions")
        return FAILED
    if isinstance(error, KeyboardInterrupt):
        _say("interrupted")
        return status_for(signal.SIGINT)
    if isinstance(error, Stopped):
        _say(f"stopped by {signal.Signals(error.signum).name}")
        return status_for(error.signum)
    raise error


@contextlib.contextmanager
def signals_stop() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``Stopped`` in the main thread while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped(signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _Mapped:
    def invoke(self, ctx: click.Context) -> Any:
        try:
            with signals_stop():
                return super().invoke(ctx)  # type: ignore[misc]
        except (AptBundleError, OSError, KeyboardInterrupt, Stopped) as e:
            ctx.exit(report(e))


class CommandGroup(_Mapped, click.Group):
    """A click group whose commands follow the exit rule."""


class Command(_Mapped, click.Command):
    """A click command that follows the exit rule."""


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

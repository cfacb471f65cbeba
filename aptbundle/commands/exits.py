"""One rule for exit statuses, for every program of the project (``aptbundle``, the trainer,
``generate``): 0 done, 1 failed (one line per problem on stderr, never a traceback for a
problem with the user's input or disk), 2 misuse of flags (click's own), 130 interrupted.
"""

from __future__ import annotations

from typing import Any

import click

from aptbundle.ground.errors import AptBundleError, VerifyError

FAILED, USAGE, INTERRUPTED = 1, 2, 130


def report(error: BaseException) -> int:
    """Print ``error`` as the user should see it; return the exit status it means."""
    if isinstance(error, VerifyError):
        for p in error.problems:
            click.echo(f"error: {p}", err=True)
        click.echo(f"error: {error.args[0].split(':')[0]}: {len(error.problems)} problem(s)", err=True)
        return FAILED
    if isinstance(error, AptBundleError):
        click.echo(f"error: {error}", err=True)
        return FAILED
    if isinstance(error, OSError):  # disk full, permission denied: the user's environment, not a bug
        where = f"{error.filename}: " if getattr(error, "filename", None) else ""
        click.echo(f"error: {where}{error.strerror or error}; check the path, free space and permissions", err=True)
        return FAILED
    if isinstance(error, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        return INTERRUPTED
    raise error


class _Mapped:
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except (AptBundleError, OSError, KeyboardInterrupt) as e:
            ctx.exit(report(e))


class Group(_Mapped, click.Group):
    """A click group whose commands follow the exit rule."""


class Command(_Mapped, click.Command):
    """A click command that follows the exit rule."""


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

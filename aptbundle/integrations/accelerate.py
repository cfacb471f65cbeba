"""accelerate: back ``save_state``'s folders up to a store, one line in the training script.

::

    accelerator = Accelerator(project_config=ProjectConfiguration(project_dir="runs/run1",
                                                                  automatic_checkpoint_naming=True))
    guard = protect(accelerator, "s3://bucket/runs")          # the one line
    start = restore("s3://bucket/runs", "run1", "runs/run1", accelerator)   # and the way back

accelerate has no hook after ``save_state``, so ``protect`` wraps that method of the one
``Accelerator``: once it returned (the state is written), the project folder is taken as it is
and pushed in the background. The final push happens at ``guard.close()`` or when the process
exits. A loop that wants to honour a pre-emption checks ``guard.should_stop`` (SIGTERM or SIGINT
came): save the state and leave the loop; ``guard.close()`` then pushes and exits 143 (or 130).
"""

from __future__ import annotations

import atexit
from pathlib import Path

from aptbundle.integrations.live import Protection
from aptbundle.integrations.live import restore as _restore

__all__ = ["Guard", "protect", "restore"]


class Guard(Protection):
    """What ``protect`` returns: the backup, and whether a pre-emption asks the loop to stop."""

    @property
    def should_stop(self) -> bool:
        return self.preemption.requested

    def close(self) -> None:
        """The final push, waited for; exits 143 (or 130) if a pre-emption came."""
        if not getattr(self, "_closed", False):
            self._closed = True
            self.finish()


def protect(accelerator, store: str | Path, *, name: str | None = None, sign: str | Path | None = None) -> Guard:
    """Push ``accelerator``'s project folder to ``store`` after each ``save_state``."""
    guard = Guard(store, name=name, sign=sign)
    guard.start(accelerator.project_configuration.project_dir or accelerator.project_dir, accelerator.is_main_process)
    original = accelerator.save_state

    def save_state(*args, **kwargs):
        out = original(*args, **kwargs)
        if guard.backup is not None:
            guard.backup.saved()
        return out

    accelerator.save_state = save_state
    atexit.register(lambda: guard.backup.close() if guard.backup is not None and not getattr(guard, "_closed", False)
                    else None)
    return guard


def restore(store: str | Path, name: str, output_dir: str | Path, accelerator=None, *,
            trust: list[str | Path] | None = None) -> str | None:
    """The newest pushed version of run ``name`` into ``output_dir``; the newest state folder to
    pass to ``accelerator.load_state(...)``, or None (start fresh). Given the ``accelerator``,
    it also loads that state and sets ``project_configuration.iteration`` past it, so the next
    automatic save does not overwrite it."""
    path = _restore(store, name, output_dir, trust=trust)
    if path is not None and accelerator is not None:
        accelerator.load_state(path)
        number = Path(path).name.rsplit("_", 1)[-1]
        if number.isdigit():
            accelerator.project_configuration.iteration = int(number) + 1
    return path

"""CacheManager: the project-local ``.cache/`` for temporary files, logs and the like.

Nothing of a run's work in progress goes to the home folder: the default root is ``.cache/``
in the current project folder, with subfolders ``temp``, ``logs``, ... created on demand.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from aptbundle import pid_alive
from apt_model.errors import APTError

SUBFOLDERS = ("temp", "logs", "models", "data")


class CacheManager:
    """Project-local cache folders.

    For example::

        CacheManager().get_cache_path("temp")  ->  PosixPath('.cache/temp')
    """

    def __init__(self, cache_dir: str | Path | None = None):
        self.root = Path(cache_dir) if cache_dir is not None else Path.cwd() / ".cache"

    def get_cache_path(self, kind: str = "temp", name: str | None = None, create: bool = True) -> Path:
        """``ROOT/kind`` (or ``ROOT/kind/name``), created unless ``create`` is False."""
        if "/" in kind or kind in ("", ".", ".."):
            raise APTError(f"cache kind {kind!r}: expected a simple folder name such as 'temp'")
        path = self.root / kind
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path / name if name else path

    def clean_cache(self, kind: str | None = "temp", older_than_s: float | None = None) -> int:
        """Delete the entries of ``ROOT/kind`` (all kinds if None), optionally only old ones.

        Returns how many entries were removed.
        """
        kinds = [kind] if kind else [p.name for p in self.root.iterdir()] if self.root.is_dir() else []
        removed = 0
        now = time.time()
        for k in kinds:
            folder = self.root / k
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                try:
                    if older_than_s is not None and now - entry.lstat().st_mtime < older_than_s:
                        continue
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def session_temp(self, label: str) -> Path:
        """A temp folder for this process (``temp/LABEL-PID``); stale ones of dead processes go."""
        base = self.get_cache_path("temp")
        for entry in base.iterdir():
            pid = entry.name.rsplit("-", 1)[-1]
            if entry.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
        path = base / f"{label}-{os.getpid()}"
        path.mkdir(exist_ok=True)
        return path

"""What never travels with a run: a few names every user expects left behind, and ``.aptignore``.

``.aptignore`` at the top of a run is a gitignore-style list (``pathspec``'s gitwildmatch: ``*``,
``**``, ``dir/``, ``!keep``) of files that ``init``, ``init --update`` and ``verify`` pass over:
TensorBoard event files, editor backups, anything that should stay on this machine. The file
itself is part of the run, so the rules travel with it. Without it only the built-in names are
left out: ``.DS_Store``, ``Thumbs.db``, ``desktop.ini``, ``__pycache__/``,
``.ipynb_checkpoints/``, editor swap and backup files (``.*.swp``, ``*~``).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

IGNORE_FILE = ".aptignore"
MAX_IGNORE_BYTES = 1 << 20
_BUILTIN_FILES = (".DS_Store", "Thumbs.db", "desktop.ini", ".*.swp", ".*.swo", "*~", "._*")
_BUILTIN_DIRS = ("__pycache__", ".ipynb_checkpoints")


class Ignore:
    """The ignore rules of one run folder."""

    def __init__(self, root: Path):
        self.spec = None
        path = Path(root) / IGNORE_FILE
        try:
            with open(path, "rb") as f:
                text = f.read(MAX_IGNORE_BYTES).decode("utf-8", "replace")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return
        import pathspec  # only runs with an ignore file pay for it

        self.spec = pathspec.GitIgnoreSpec.from_lines(text.splitlines())

    def dir_ignored(self, rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        return name in _BUILTIN_DIRS or (self.spec is not None and self.spec.match_file(rel + "/"))

    def file_ignored(self, rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        if any(fnmatch.fnmatchcase(name, p) for p in _BUILTIN_FILES):
            return True
        return self.spec is not None and rel != IGNORE_FILE and self.spec.match_file(rel)

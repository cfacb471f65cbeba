"""The one place temporary names are made, recognised and cleaned.

Work in progress (an archive being written, an unpack, a checkpoint being staged, a pack
snapshot, an atomic write) lives beside its destination under a name that says whose it is::

    .aptrun-tmp-<pid>-<random>-<label>

The writer's process id comes first, so a cleanup parses it without guessing where a label
with dashes ends; the label is compared whole, so cleaning ``exp`` never touches the work of
``exp-31337``; and only temporaries of processes that are gone are removed, so a cleanup never
deletes a live process's work. Long labels are shortened with a hash, so a name stays within
what every file system stores (255 bytes).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterator

PREFIX = ".aptrun-tmp-"
MAX_LABEL_BYTES = 96


def is_temp_name(name: str) -> bool:
    """True for names aptbundle uses for work in progress (never listed, packed or verified)."""
    return name.startswith(PREFIX)


def short_label(label: str) -> str:
    """``label`` as it appears in a temporary name: unchanged, or cut and suffixed with a hash.

    >>> short_label("run1")
    'run1'
    >>> len(short_label("x" * 300).encode())
    96
    """
    raw = label.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_LABEL_BYTES:
        return label
    digest = hashlib.sha256(raw).hexdigest()[:16]
    head = raw[:MAX_LABEL_BYTES - 17].decode("utf-8", "ignore")
    return f"{head}~{digest}"


def temp_name(label: str) -> str:
    """A fresh temporary name owned by this process."""
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{short_label(label)}"


_IN_TEXT = re.compile(re.escape(PREFIX) + r"\d+-[0-9a-f]+-")


def plain_names(text: str) -> str:
    """``text`` with every temporary name replaced by the name it stands for (its label)."""
    return _IN_TEXT.sub("", text)


def temp_path(parent: Path, label: str) -> Path:
    """A fresh temporary path inside ``parent`` (same folder as the destination: renames stay atomic)."""
    return Path(parent) / temp_name(label)


def owner(name: str) -> tuple[int, str] | None:
    """``(pid, label)`` of a temporary name, or None if it is not one of ours."""
    if not is_temp_name(name):
        return None
    parts = name[len(PREFIX):].split("-", 2)
    if len(parts) != 3 or not parts[0].isdigit():
        return None
    return int(parts[0]), parts[2]


def pid_alive(pid: int) -> bool:
    """True if a process with this id exists."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def is_stale(name: str) -> bool:
    """True for a temporary whose process is gone (names of unknown shape are left alone)."""
    who = owner(name)
    return who is not None and who[0] != os.getpid() and not pid_alive(who[0])


def remove_path(path: Path) -> None:
    """Delete a file or a folder (with everything in it); a link is removed, never followed, and
    a path that is already gone is no error."""
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def clean_stale(parent: Path, label: str | None = None) -> list[Path]:
    """Remove temporaries in ``parent`` left by processes that are gone; return what went.

    With ``label``, only temporaries made for exactly that label are considered.
    """
    removed: list[Path] = []
    want = short_label(label) if label is not None else None
    with contextlib.suppress(OSError):
        for p in Path(parent).iterdir():
            who = owner(p.name)
            if who is None or (want is not None and who[1] != want) or not is_stale(p.name):
                continue
            remove_path(p)
            removed.append(p)
    return removed


@contextlib.contextmanager
def temp_dir(parent: Path, label: str, mode: int = 0o755) -> Iterator[Path]:
    """A fresh folder in ``parent``, removed again if the block fails (the caller renames it on success)."""
    path = temp_path(parent, label)
    path.mkdir(mode=mode)
    try:
        yield path
    except BaseException:
        remove_path(path)
        raise

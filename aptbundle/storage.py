"""Where archives live: local paths and fsspec URLs, and the temporaries written beside them.

A local archive is written under a temporary name in its folder and renamed into place; a
temporary carries its writer's process id, so the next writer can remove what a killed one
left. A URL (``s3://bucket/run1.aptrun.tar.zst``) is read and written through fsspec.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from aptbundle.errors import ArchiveError
from aptbundle.fsutil import TMP_PREFIX, pid_alive

SUFFIX = ".aptrun.tar.zst"
CHUNK = 1 << 20


def is_remote(path: str | Path) -> bool:
    """True for a URL such as ``s3://bucket/run1.aptrun.tar.zst`` (read and written via fsspec)."""
    return "://" in str(path)


def remote_fs(url: str):
    """``(filesystem, path)`` for a URL, or a clear error naming the package to install."""
    try:
        import fsspec

        return fsspec.url_to_fs(url)
    except ImportError as e:
        raise ArchiveError(f"{url}: remote archives need fsspec and the backend for this URL ({e.name or e});"
                           " install them with `pip install aptbundle[s3]`") from None
    except ValueError as e:
        raise ArchiveError(f"{url}: not a usable URL ({e})") from None


def archive_name(run_name: str) -> str:
    """``run1`` -> ``run1.aptrun.tar.zst``."""
    return run_name + SUFFIX


def clean_stale(parent: Path, stem: str) -> None:
    """Remove temporaries ``.aptrun-tmp-STEM-PID-*`` left in ``parent`` by processes now dead."""
    prefix = f"{TMP_PREFIX}{stem}-"
    with contextlib.suppress(OSError):
        for p in parent.iterdir():
            if p.name.startswith(prefix):
                pid = p.name[len(prefix):].split("-", 1)[0]
                if pid.isdigit() and not pid_alive(int(pid)):
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def temp_for(target: Path) -> Path:
    return target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}-{os.urandom(3).hex()}"



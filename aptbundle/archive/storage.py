"""Where archives live: local paths and fsspec URLs, opened for streaming reads and writes.

A local archive is written under a temporary name in its folder (``temporaries``) and renamed
into place; a URL (``s3://bucket/run1.aptrun.tar.zst``) is read and written through fsspec, an
upload becoming visible only when it completes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from aptbundle.ground.errors import SourceError
from aptbundle.transfer.remote import is_remote, remote_fs

SUFFIX = ".aptrun.tar.zst"
def archive_name(run_name: str) -> str:
    """``run1`` -> ``run1.aptrun.tar.zst``."""
    return run_name + SUFFIX


def open_source(path: str | Path) -> tuple[BinaryIO, str, int]:
    """The archive opened for streaming (a local file or a remote object), its name, its size."""
    if is_remote(path):
        fs, rpath = remote_fs(str(path))
        try:
            size = fs.size(rpath)
            return fs.open(rpath, "rb", block_size=8 << 20, cache_type="readahead"), str(path).rsplit("/", 1)[-1], size
        except FileNotFoundError:
            raise SourceError(f"{path}: no such remote archive; check the URL") from None
    p = Path(path)
    if p.is_dir():
        raise SourceError(f"{path}: is a folder without aptrun.json; expected a run folder or a {SUFFIX} file")
    try:
        f = open(p, "rb")
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file or folder; expected a run folder or a {SUFFIX} file") from None
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        f.close()
        raise SourceError(f"{path}: is an empty file; expected a {SUFFIX} archive")
    return f, p.name, size

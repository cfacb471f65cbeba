"""Runs at URLs: ``s3://bucket/runs`` and any other fsspec URL, for archives and stores alike."""

from __future__ import annotations

from pathlib import Path

from aptbundle.ground.errors import SourceError

def is_remote(path: str | Path) -> bool:
    """True for a URL such as ``s3://bucket/run1.aptrun.tar.zst`` (read and written via fsspec)."""
    return "://" in str(path)


def remote_fs(url: str, **options):
    """``(filesystem, path)`` for a URL (``options`` for its filesystem), or a clear error naming
    the package to install."""
    try:
        import fsspec

        return fsspec.url_to_fs(url, **options)
    except ImportError as e:
        raise SourceError(f"{url}: remote archives need fsspec and the backend for this URL ({e.name or e});"
                           " install them with `pip install aptbundle[s3]`") from None
    except ValueError as e:
        raise SourceError(f"{url}: not a usable URL ({e})") from None

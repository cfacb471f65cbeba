"""The archive: one verified ``NAME.aptrun.tar.zst`` per run.

``tarstream`` (a strict tar writer and reader), ``writer`` (``pack``, a loop over the read view
of ``transfer``), ``reader`` (the one ``ArchiveReader``), ``extract`` (``unpack``, a loop over
the reader into the materializer of ``transfer``, and ``verify_archive``) and ``storage`` (where
archives live). Nothing here imports torch. The names below load their module on first
use, so a command imports only what it runs.
"""

from __future__ import annotations

import importlib

_NAMES = {"unpack": "extract", "verify_archive": "extract", "ArchiveReader": "reader",
          "read_archive_manifest": "reader", "SUFFIX": "storage", "archive_name": "storage",
          "PackResult": "writer", "pack": "writer", "write_archive": "writer"}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"aptbundle.archive.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'aptbundle.archive' has no attribute {name!r}")

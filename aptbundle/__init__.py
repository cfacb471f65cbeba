"""aptbundle: make a training run portable.

A run is one self-describing directory (``Run``); an archive is one verified
``NAME.aptrun.tar.zst`` (``pack``, ``unpack``); ``Checkpointer`` saves and restores complete
training state into a run. Importing this package never imports torch: the names below are
loaded when first used.

The layers, lowest first (each imports only from those below it; ``lint-imports`` checks it):
``ground`` (errors, problems, file helpers, temporaries, path rules, locks), ``format``
(manifest, scan, trust, run, verify, signatures), ``state`` (the checkpointer), ``layouts``
(foreign training outputs, ``adopt``), ``archive`` (tar + zstd,
codec, reader, writer), ``store`` (push, pull, ls, gc, backups) and ``commands`` (resume, the
command line).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys

__version__ = "0.2.0"

from aptbundle.ground.errors import AptBundleError  # noqa: E402

_PUBLIC = {
    "Run": "aptbundle.format.run", "Manifest": "aptbundle.format.manifest",
    "load_manifest": "aptbundle.format.manifest", "adopt": "aptbundle.layouts.adopt",
    "verify_run": "aptbundle.format.verify", "verify_checkpoint": "aptbundle.format.verify",
    "VerifiedCheckpoint": "aptbundle.format.verify", "Checkpointer": "aptbundle.state.checkpoint",
    "verify_on_main": "aptbundle.state.checkpoint", "unwrap": "aptbundle.state.checkpoint",
    "pack": "aptbundle.archive", "unpack": "aptbundle.archive", "verify_archive": "aptbundle.archive",
    "ArchiveReader": "aptbundle.archive", "verify_path": "aptbundle.commands.overview",
    "describe": "aptbundle.commands.overview", "push": "aptbundle.store.push", "pull": "aptbundle.store.pull",
    "Backup": "aptbundle.store.backup", "gc": "aptbundle.store.maintain", "list_store": "aptbundle.store.maintain",
}
__all__ = ["AptBundleError", "__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'aptbundle' has no attribute {name!r}")


# Import paths of aptbundle 0.1, kept working for code written against them.
_MOVED = {
    "errors": "ground.errors", "paths": "ground.paths", "fsutil": "ground.fsutil",
    "manifest": "format.manifest", "scan": "format.scan", "run": "format.run", "verify": "format.verify",
    "checkpoint": "state.checkpoint", "tarstream": "archive.tarstream", "codec": "archive.codec",
    "storage": "archive.storage", "cli": "commands.cli", "resume": "commands.resume",
}


class _Moved:
    """Serves ``aptbundle.run`` and friends as the modules that now hold their code (a finder and
    loader for ``sys.meta_path``)."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, tail = fullname.partition(".")
        if head == "aptbundle" and tail in _MOVED:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(f"aptbundle.{_MOVED[spec.name.partition('.')[2]]}")

    def exec_module(self, module) -> None:
        pass


if not any(isinstance(f, _Moved) for f in sys.meta_path):
    sys.meta_path.append(_Moved())

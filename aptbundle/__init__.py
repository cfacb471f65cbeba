"""aptbundle: make a training run portable.

A run is one self-describing directory (``Run``); an archive is one verified
``NAME.aptrun.tar.zst`` (``pack``, ``unpack``); a store keeps runs deduplicated (``push``,
``pull``); ``Checkpointer`` saves and restores complete training state into a run. Importing
this package never imports torch: the names below are loaded when first used.

The names here are the whole public API: a training loop (``apt_model`` among them) needs
nothing else. How the package is built inside, layer by layer, is in ``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import warnings

__version__ = "0.4.0"

from aptbundle.ground.errors import AptBundleError  # noqa: E402

_PUBLIC = {
    # errors
    **{n: "aptbundle.ground.errors" for n in (
        "ArchiveError", "CheckpointError", "ManifestError", "MaterializeError", "ResumeError", "RunError",
        "SignatureError", "StoreError", "UnsafeContentError", "UnsafePathError", "VerifyError")},
    "check_name": "aptbundle.ground.paths", "pid_alive": "aptbundle.ground.temporaries",
    # the run and its checks
    "Run": "aptbundle.format.run", "building_run": "aptbundle.format.run",
    "environment_info": "aptbundle.format.run", "Manifest": "aptbundle.format.manifest",
    "load_manifest": "aptbundle.format.manifest", "METRICS_FILE": "aptbundle.format.metrics",
    "verify_run": "aptbundle.format.verify", "verify_files": "aptbundle.format.verify",
    "verify_checkpoint": "aptbundle.format.verify", "VerifiedCheckpoint": "aptbundle.format.verify",
    # saving and loading training state
    "Checkpointer": "aptbundle.state.checkpoint", "verify_on_main": "aptbundle.state.checkpoint",
    "unwrap": "aptbundle.state.checkpoint", "checkpoint_name": "aptbundle.state.checkpoint",
    "MODEL_FILE": "aptbundle.state.checkpoint", "ProcessGroup": "aptbundle.state.collective",
    "adopt": "aptbundle.layouts.adopt",
    # moving a run
    "pack": "aptbundle.archive", "unpack": "aptbundle.archive", "verify_archive": "aptbundle.archive",
    "ArchiveReader": "aptbundle.archive", "push": "aptbundle.store.push", "pull": "aptbundle.store.pull",
    "Backup": "aptbundle.store.backup", "gc": "aptbundle.store.maintain", "list_store": "aptbundle.store.maintain",
    # resuming, and what a command-line program of a trainer shares with aptbundle's
    "verify_path": "aptbundle.commands.overview", "describe": "aptbundle.commands.overview",
    "ResumeRequest": "aptbundle.commands.resume", "ResumeResult": "aptbundle.commands.resume",
    "ResumeTrainer": "aptbundle.commands.resume", "progress": "aptbundle.commands.progress",
    "Command": "aptbundle.commands.exits", "CONTEXT": "aptbundle.commands.exits",
    "status_for": "aptbundle.commands.exits",
}
__all__ = ["AptBundleError", "__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'aptbundle' has no attribute {name!r}")


# Import paths of aptbundle 0.1, kept for one more release behind a DeprecationWarning.
_MOVED = {
    "errors": "ground.errors", "paths": "ground.paths", "fsutil": "ground.fsutil",
    "manifest": "format.manifest", "scan": "format.scan", "run": "format.run", "verify": "format.verify",
    "checkpoint": "state.checkpoint", "tarstream": "archive.tarstream", "codec": "transfer.codec",
    "storage": "archive.storage", "cli": "commands.cli", "resume": "commands.resume",
}


class _Moved:
    """Serves ``aptbundle.run`` and friends as the modules that now hold their code, with a
    ``DeprecationWarning`` naming the new path (a finder and loader for ``sys.meta_path``)."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, tail = fullname.partition(".")
        if head == "aptbundle" and tail in _MOVED:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        new = f"aptbundle.{_MOVED[spec.name.partition('.')[2]]}"
        warnings.warn(f"{spec.name} is deprecated and goes in aptbundle 0.4; import {new} (or the name from"
                      " aptbundle itself)", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        pass


if not any(isinstance(f, _Moved) for f in sys.meta_path):
    sys.meta_path.append(_Moved())

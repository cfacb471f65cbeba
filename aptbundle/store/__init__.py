"""A run store: content-addressed, deduplicated push and pull, ls, gc, and backups while training.

Imported lazily: ``from aptbundle.store import push`` loads only what push needs.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "Store": "backend", "push": "push", "PushResult": "push", "pull": "pull", "PullResult": "pull",
    "list_store": "maintain", "gc": "maintain", "log": "maintain", "forget": "maintain", "check": "check",
    "upgrade": "upgrade", "Backup": "backup", "split_ref": "backup",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"aptbundle.store.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'aptbundle.store' has no attribute {name!r}")

"""A run's ref: the chain of its pushed versions, newest last, updated compare-and-swap.

::

    aptref 2
    DIGEST PARENT TIME        one line per version: its run digest, the version it was pushed
    ...                        on top of (``-`` for the first), and when (seconds since 1970)

A version-1 ref (one digest) reads as a chain of one. ``update`` reads the ref, adds a version
and writes it back only if nobody changed it meanwhile (``Store.swap``: a lock and a rename in
a folder, a conditional put on S3), else reads again and retries: two machines pushing the same
run at once (a pre-empted machine's last push landing after the next machine took over) both
keep their version, and the one whose parent is not the newest shows as a fork in ``log``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from aptbundle.ground.errors import StoreError
from aptbundle.store import layout
from aptbundle.store.backend import Store

HEAD = "aptref 2"
MAX_VERSIONS = 10_000
MAX_REF_BYTES = 160 * MAX_VERSIONS
_LINE = re.compile(r"([0-9a-f]{64}) ([0-9a-f]{64}|-) ([0-9]{1,12}(?:\.[0-9]{1,9})?)")


@dataclass(frozen=True)
class Version:
    digest: str
    parent: str | None
    time: float


def parse_ref(raw: bytes, shown: str, mtime: float = 0.0) -> list[Version]:
    """The versions a ref names, oldest first; refuses a ref that is not one."""
    text = raw.decode("ascii", "replace")
    lines = text.splitlines()
    if len(lines) == 1 and layout.is_digest(lines[0].strip()):  # a version-1 ref: the newest digest alone
        return [Version(lines[0].strip(), None, mtime)]
    if not lines or lines[0] != HEAD or len(lines) - 1 > MAX_VERSIONS:
        raise StoreError(f"{shown}: is not a ref (expected {HEAD!r} and one line per version); the store is"
                         " damaged or crafted")
    out, seen = [], set()
    for n, line in enumerate(lines[1:], 2):
        m = _LINE.fullmatch(line)
        if m is None or m[1] in seen:
            raise StoreError(f"{shown}: line {n} is not 'DIGEST PARENT TIME' of a new version; the store is"
                             " damaged or crafted")
        seen.add(m[1])
        out.append(Version(m[1], None if m[2] == "-" else m[2], float(m[3])))
    if not out:
        raise StoreError(f"{shown}: names no version; the store is damaged or crafted")
    return out


def format_ref(versions: list[Version]) -> bytes:
    return "\n".join([HEAD] + [f"{v.digest} {v.parent or '-'} {v.time:.3f}" for v in versions]).encode() + b"\n"


def read_ref(store: Store, name: str) -> tuple[list[Version], bytes | None]:
    """The versions of run ``name`` (empty if the store has none) and the ref's bytes as read."""
    key = layout.ref(name)
    raw = store.read(key, MAX_REF_BYTES)
    if raw is None:
        return [], None
    versions = parse_ref(raw, store.where(key))
    if len(versions) == 1 and versions[0].time == 0.0:  # a version-1 ref: its time is the object's
        found = store.backend.stat(key)
        versions = [Version(versions[0].digest, None, found.mtime if found else 0.0)]
    return versions, raw


def update(store: Store, name: str, change, tries: int = 50) -> list[Version]:
    """Apply ``change(versions) -> versions`` to the ref of ``name`` compare-and-swap; the result."""
    key = layout.ref(name)
    for attempt in range(tries):
        versions, raw = read_ref(store, name)
        new = change(list(versions))
        if new == versions:
            return versions
        if store.swap(key, raw, format_ref(new)):
            return new
        time.sleep(min(0.05 * (attempt + 1), 1.0))
    raise StoreError(f"{store.where(key)}: changed under every one of {tries} attempts to update it; another"
                     " push is racing this one, try again")


def add_version(store: Store, name: str, digest: str, parent: str | None) -> list[Version]:
    """Record ``digest`` as the newest version of ``name`` (pushed on top of ``parent``)."""
    def change(versions: list[Version]) -> list[Version]:
        if any(v.digest == digest for v in versions):
            return versions  # the same state pushed again (or our own put, applied but unanswered)
        return (versions + [Version(digest, parent, round(time.time(), 3))])[-MAX_VERSIONS:]

    return update(store, name, change)

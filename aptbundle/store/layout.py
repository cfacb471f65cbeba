"""The store's layout: the one place that knows every key, and what a key may be.

::

    STORE/format                       the store's format version (``aptstore 2``)
    STORE/objects/sha256/ab/abcd…      one object: a tensor, a storage entry, a header or a small
                                       file, by the SHA-256 of its bytes (``objects``)
    STORE/recipes/sha256/ab/abcd…      one file: its size, SHA-256 and parts (``recipes``)
    STORE/manifests/sha256/12/1234…    a run's manifest, by run digest (+ ``.sig`` when signed,
                                       ``.modes`` when a file's mode is not 0644)
    STORE/refs/NAME                    the chain of the run's pushed versions (``refs``)
    STORE/locks/KIND-HOST-PID-RANDOM.json   a push or gc in progress (``locks``)
    STORE/blobs/sha256/ab/abcd…        version 1 only: one file's bytes, zstd (``blobs``)

Every key is built here from checked parts (a digest is 64 hex digits, a run name passes the
portable-name rules), and ``parts`` refuses any key that is not a plain relative path, so a key
can never name something outside the store. Readers parse listings back through ``digest_of``
and ``ref_name``, never by slicing strings.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from aptbundle.ground.errors import StoreError, UnsafePathError
from aptbundle.ground.paths import check_name
from aptbundle.ground.temporaries import is_temp_name

BLOBS, MANIFESTS, REFS, LOCKS = "blobs", "manifests", "refs", "locks"
OBJECTS, RECIPES, FORMAT = "objects", "recipes", "format"
TOPS = (OBJECTS, RECIPES, MANIFESTS, REFS, LOCKS, BLOBS)
SIG_SUFFIX = ".sig"
MODES_SUFFIX = ".modes"
FORMAT_TEXT = b"aptstore 2\n"
HEX64 = re.compile(r"[0-9a-f]{64}")
_LOCK = re.compile(r"(push|gc)-[A-Za-z0-9._-]{1,64}-\d{1,10}-[0-9a-f]{12}\.json")



def is_digest(text: str) -> bool:
    return bool(HEX64.fullmatch(text))


def _digest(d: str) -> str:
    if not is_digest(d):
        raise StoreError(f"{str(d)[:80]!r}: not a SHA-256 digest (64 hex digits)")
    return d


def blob(sha256: str) -> str:
    d = _digest(sha256)
    return f"{BLOBS}/sha256/{d[:2]}/{d}"


def object(sha256: str) -> str:
    d = _digest(sha256)
    return f"{OBJECTS}/sha256/{d[:2]}/{d}"


def recipe(sha256: str) -> str:
    d = _digest(sha256)
    return f"{RECIPES}/sha256/{d[:2]}/{d}"


def manifest(digest: str) -> str:
    d = _digest(digest)
    return f"{MANIFESTS}/sha256/{d[:2]}/{d}"


def signature(digest: str) -> str:
    return manifest(digest) + SIG_SUFFIX


def modes(digest: str) -> str:
    return manifest(digest) + MODES_SUFFIX


def ref(name: str) -> str:
    try:
        return f"{REFS}/{check_name(name)}"
    except UnsafePathError as e:
        raise StoreError(f"run name {name[:80]!r}: {e}") from None


def lock(kind: str, host: str, pid: int, token: str) -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "_", host)[:64] or "host"
    key = f"{LOCKS}/{kind}-{host}-{pid}-{token}.json"
    if not _LOCK.fullmatch(key.split("/", 1)[1]):
        raise StoreError(f"{key}: not a lock name this version makes")
    return key


def base(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def digest_of(key: str) -> str | None:
    """The digest a blob, manifest or signature key is named by (None for anything else: a
    temporary, or a stray file)."""
    name = base(key).removesuffix(SIG_SUFFIX).removesuffix(MODES_SUFFIX)
    return name if is_digest(name) else None


def ref_name(key: str) -> str | None:
    """The run name of a ref key (None for a temporary or a key in a subfolder)."""
    rest = key.removeprefix(REFS + "/")
    if rest == key or "/" in rest or is_temp_name(rest):
        return None
    return rest


def is_lock(key: str) -> bool:
    return bool(_LOCK.fullmatch(base(key))) and key.startswith(LOCKS + "/")


def parts(key: str) -> list[str]:
    """The components of a key; refuses anything that could leave the store (``..``, an absolute
    path, empty or odd components)."""
    if key == FORMAT:
        return [FORMAT]
    comps = key.split("/")
    if not key or any(c in ("", ".", "..") or "\\" in c or "\0" in c for c in comps) or comps[0] not in TOPS:
        raise StoreError(f"{key[:120]!r}: not a key of this store's layout")
    return comps


class Entry(NamedTuple):
    """One object of a listing."""

    key: str
    mtime: float
    size: int

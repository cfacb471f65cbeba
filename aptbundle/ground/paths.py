"""Portable path rules: the one place that decides whether a path may live in a run.

Every path in a run, in its manifest and in an archive is relative, POSIX-style, NFC-normalised
and storable on Linux, macOS and Windows alike. ``normalize_relpath`` validates one path and
returns its canonical spelling; ``check_collisions`` refuses sets of paths that would collide on
a case-insensitive file system. Everything else in aptbundle calls these two.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable

from aptbundle.ground.errors import UnsafePathError

MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096
MAX_DEPTH = 256  # folders within folders: beyond this no run goes, and file systems and tools give up
_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(1, 10)} | {
    f"LPT{i}" for i in range(1, 10)
}
_DRIVE = re.compile(r"^[A-Za-z]:")
# Characters Windows cannot store in a file name (':' also opens NTFS alternate streams).
_WINDOWS_FORBIDDEN = set('<>:"|?*')


def _is_control(ch: str) -> bool:
    # Cc: control characters; Cf: format characters (bidi overrides, zero-width joiners and
    # spaces), which make a name print as another one
    return unicodedata.category(ch) in ("Cc", "Cf")


def normalize_relpath(path: str, *, what: str = "path") -> str:
    """Validate a relative run path and return its NFC form.

    Raises ``UnsafePathError`` naming the rule that was broken.

    >>> normalize_relpath("checkpoints/step-00000010/model.safetensors")
    'checkpoints/step-00000010/model.safetensors'
    """
    if not isinstance(path, str):
        raise UnsafePathError(f"{what} {path!r}: expected a string, found {type(path).__name__}")
    shown = repr(path)
    if path == "":
        raise UnsafePathError(f"{what} is empty: expected a relative path such as 'config.json'")
    for ch in path:
        if _is_control(ch):
            raise UnsafePathError(
                f"{what} {shown}: contains control or invisible character {ch!r}; rename the file"
            )
    if "\\" in path:
        raise UnsafePathError(
            f"{what} {shown}: contains a backslash; paths use '/' and no file name may hold '\\'"
        )
    if path.startswith("/"):
        raise UnsafePathError(f"{what} {shown}: is absolute; expected a path relative to the run")
    if _DRIVE.match(path):
        raise UnsafePathError(f"{what} {shown}: starts with a drive letter; expected a relative path")
    nfc = unicodedata.normalize("NFC", path)
    if len(nfc.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise UnsafePathError(f"{what} {shown}: longer than {MAX_PATH_BYTES} bytes")
    try:
        nfc.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(f"{what} {shown}: is not valid Unicode (lone surrogate)") from None
    comps = nfc.split("/")
    if len(comps) > MAX_DEPTH:
        raise UnsafePathError(f"{what} {shown[:80]}…: {len(comps)} levels deep; at most {MAX_DEPTH} are accepted")
    for comp in comps:
        if comp == "":
            raise UnsafePathError(f"{what} {shown}: has an empty component ('//' or a trailing '/')")
        if comp in (".", ".."):
            raise UnsafePathError(f"{what} {shown}: has a '{comp}' component; expected a plain path")
        bad = sorted(set(comp) & _WINDOWS_FORBIDDEN)
        if bad:
            raise UnsafePathError(
                f"{what} {shown}: component {comp!r} holds {''.join(bad)!r}, which Windows cannot store"
            )
        if comp[-1] in ". ":
            raise UnsafePathError(
                f"{what} {shown}: component {comp!r} ends with a dot or a space, which Windows drops"
            )
        if comp.split(".")[0].rstrip(" ").upper() in _RESERVED:
            raise UnsafePathError(
                f"{what} {shown}: component {comp!r} is a reserved device name on Windows"
            )
        if len(comp.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise UnsafePathError(
                f"{what} {shown}: component longer than {MAX_COMPONENT_BYTES} bytes"
            )
    return nfc


def check_name(name: str, *, what: str = "run name") -> str:
    """Validate a single path component (a run or checkpoint name) and return its NFC form."""
    nfc = normalize_relpath(name, what=what)
    if "/" in nfc:
        raise UnsafePathError(f"{what} {name!r}: expected one name, found a path with '/'")
    return nfc


def collision_key(path: str) -> str:
    """The key under which two paths collide on a case-insensitive, normalising file system."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", path).casefold())


def check_collisions(paths: Iterable[str], *, what: str = "path") -> None:
    """Refuse duplicate paths and paths that differ only by case or Unicode normalisation.

    A path is also refused when it is used both as a file and as a folder.

    >>> check_collisions(["a/b", "a/c"])
    """
    seen: dict[str, str] = {}
    folders: dict[str, str] = {}
    for p in paths:
        key = collision_key(p)
        if key in seen:
            if seen[key] == p:
                raise UnsafePathError(f"{what} {p!r} appears twice; expected each path once")
            raise UnsafePathError(
                f"{what} {p!r} collides with {seen[key]!r} on a case-insensitive file system;"
                " rename one of them"
            )
        seen[key] = p
        parts = key.split("/")
        for i in range(1, len(parts)):
            folders.setdefault("/".join(parts[:i]), p)
    for key, p in seen.items():
        if key in folders:
            raise UnsafePathError(
                f"{what} {p!r} is a file but {folders[key]!r} uses it as a folder"
            )

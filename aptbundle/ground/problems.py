"""What a check finds: one ``Problem`` per file that differs, one ``Report`` per verification.

These are plain data. How they are shown to a person (one line each, sizes in kB) is the
command line's business; ``to_dict`` gives what ``--json`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Kind(str, Enum):
    """What kind of difference a ``Problem`` is (its value is what ``--json`` prints)."""

    MISSING = "missing"  # a listed file (or blob) is not there
    EXTRA = "extra"  # a file on disk the manifest does not list
    SIZE = "size"  # the bytes are more or fewer than listed
    HASH = "hash"  # the bytes differ from the listed SHA-256
    UNSAFE = "unsafe"  # the content would run code or read out of bounds if loaded, or a name is unportable
    TYPE = "type"  # a link or special file where a regular file belongs
    LINK = "link"  # a recorded link is gone or points elsewhere
    ARCHIVE = "archive"  # the archive itself is malformed
    BLOB = "blob"  # a store's blob is malformed
    SIGNATURE = "signature"  # no signature by a trusted key
    UNTRUSTED = "untrusted"  # note: an arbitrary pickle carried, never loaded
    MACHINE_PATH = "machine-path"  # note: an absolute path of the machine that wrote the file
    HIDDEN = "hidden"  # note: a file the ignore rules keep out that the scan would have read

    def __str__(self) -> str:
        return self.value


@dataclass
class Problem:
    """One way a run or archive differs from its manifest."""

    path: str
    kind: Kind
    expected: str
    found: str

    def __post_init__(self) -> None:
        self.kind = Kind(self.kind)  # a plain string is taken if it names a kind; anything else is a bug

    def __str__(self) -> str:
        return f"{self.path}: {self.kind.value}: expected {self.expected}, found {self.found}"

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind.value, "expected": self.expected, "found": self.found}


NOTE_KINDS = frozenset({Kind.UNTRUSTED, Kind.MACHINE_PATH, Kind.HIDDEN})


def is_note(p: Problem, strict: bool = False) -> bool:
    """True for what is reported but does not fail a check: a file carried as untrusted (unless
    ``strict``), an absolute path of another machine recorded inside a file."""
    return p.kind in NOTE_KINDS and not (strict and p.kind == Kind.UNTRUSTED)


def split(found: list[Problem], strict: bool = False) -> tuple[list[Problem], list[Problem]]:
    """``(errors, notes)`` of what a check found."""
    return [p for p in found if not is_note(p, strict)], [p for p in found if is_note(p, strict)]


@dataclass
class Report:
    """Outcome of one verification: what was checked and every problem found."""

    path: str
    kind: str  # "run", "checkpoint" or "archive"
    files: int = 0
    size: int = 0
    digest: str = ""
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)  # untrusted files carried, machine paths

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "ok": self.ok, "files": self.files,
                "size": self.size, "digest": self.digest, "problems": [p.to_dict() for p in self.problems],
                "notes": [p.to_dict() for p in self.notes]}

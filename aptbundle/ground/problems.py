"""What a check finds: one ``Problem`` per file that differs, one ``Report`` per verification.

These are plain data. How they are shown to a person (one line each, sizes in kB) is the
command line's business; ``to_dict`` gives what ``--json`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Problem:
    """One way a run or archive differs from its manifest."""

    path: str
    kind: str  # missing | extra | size | hash | unsafe | type | archive | busy; notes: untrusted | machine-path
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.path}: {self.kind}: expected {self.expected}, found {self.found}"

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "expected": self.expected, "found": self.found}


NOTE_KINDS = frozenset({"untrusted", "machine-path"})


def is_note(p: Problem, strict: bool = False) -> bool:
    """True for what is reported but does not fail a check: a file carried as untrusted (unless
    ``strict``), an absolute path of another machine recorded inside a file."""
    return p.kind in NOTE_KINDS and not (strict and p.kind == "untrusted")


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

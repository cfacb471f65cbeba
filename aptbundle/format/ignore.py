"""What never travels with a run: a few names every user expects left behind, and ``.aptignore``.

``.aptignore`` at the top of a run is a gitignore-style list (``*``, ``?``, ``[abc]``, ``**``,
``dir/``, ``/anchored``, ``!keep``, ``\\`` escapes, ``#`` comments) of files that ``init``,
``init --update`` and ``verify`` pass over: TensorBoard event files, editor backups, anything
that should stay on this machine. The file itself is part of the run, so the rules travel with
it, and they come from whoever made the run: they are read as a regular file only (a FIFO is no
rules, never a wait), at most ``MAX_RULES`` of at most ``MAX_RULE_CHARS`` characters, and matched
one path component at a time without backtracking, so no pattern can make a match slow. Without
the file only the built-in names are left out: ``.DS_Store``, ``Thumbs.db``, ``desktop.ini``,
``__pycache__/``, ``.ipynb_checkpoints/``, editor swap and backup files (``.*.swp``, ``*~``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from aptbundle.ground.fsutil import read_capped

IGNORE_FILE = ".aptignore"
MAX_IGNORE_BYTES = 1 << 20
MAX_RULES = 1000
MAX_RULE_CHARS = 1024
_BUILTIN_FILES = (".DS_Store", "Thumbs.db", "desktop.ini", ".*.swp", ".*.swo", "*~", "._*")
_BUILTIN_DIRS = ("__pycache__", ".ipynb_checkpoints")


@lru_cache(maxsize=65536)
def glob_match(pattern: str, name: str) -> bool:
    """One path component against one glob (``*``, ``?``, ``[...]``, ``\\x``), in time linear in
    their lengths' product at worst: the classic two-pointer match that only ever goes back to
    the last ``*``.

    >>> glob_match("*a*a*a*a*a*a*a*a*a*b", "a" * 60), glob_match("*.log", "x.log"), glob_match("[!a]?", "bc")
    (False, True, True)
    """
    toks = _tokens(pattern)
    p = n = 0
    star, mark = -1, 0
    while n < len(name):
        if p < len(toks) and toks[p] != "*" and _one(toks[p], name[n]):
            p, n = p + 1, n + 1
        elif p < len(toks) and toks[p] == "*":
            star, mark, p = p, n, p + 1
        elif star >= 0:
            p, mark = star + 1, mark + 1
            n = mark
        else:
            return False
    return all(t == "*" for t in toks[p:])


@lru_cache(maxsize=4096)
def _tokens(pattern: str) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append("\\" + pattern[i + 1])
            i += 2
        elif c == "[" and (j := pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "^") else i + 1)) > i:
            out.append(pattern[i:j + 1])
            i = j + 1
        elif c == "*":
            if not out or out[-1] != "*":
                out.append("*")
            i += 1
        else:
            out.append(c)
            i += 1
    return tuple(out)


def _one(tok: str, ch: str) -> bool:
    if tok == "?":
        return True
    if tok.startswith("\\"):
        return tok[1] == ch
    if len(tok) > 2 and tok[0] == "[":
        return fnmatch.fnmatchcase(ch, tok)  # one character against one class: no backtracking
    return tok == ch


@dataclass(frozen=True)
class Rule:
    """One line of ``.aptignore``."""

    parts: tuple[str, ...]  # component globs; "**" matches any number of components
    anchored: bool  # the pattern names a path from the run's top, not a name at any depth
    dir_only: bool  # a trailing "/": only folders (and what is inside them)
    negate: bool  # "!": what earlier rules ignored travels after all

    @classmethod
    def parse(cls, line: str) -> "Rule | None":
        line = line.rstrip("\n\r")
        while line.endswith(" ") and not line.endswith("\\ "):
            line = line[:-1]
        if not line or line.startswith("#"):
            return None
        negate = line.startswith("!")
        line = line[1:] if negate else line
        if line.startswith("\\") and line[1:2] in ("!", "#"):
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        anchored = "/" in line  # a slash at the start or in the middle anchors it to the top
        parts = tuple(p for p in line.split("/") if p)
        if len(parts) > 1 and parts[-1] == "**":  # "foo/**": what is inside foo, as "foo/" says
            parts, dir_only = parts[:-1], True
        if not parts:
            return None
        return cls(parts if anchored else ("**", *parts), anchored, dir_only, negate)

    def matches(self, comps: list[str], is_dir: bool) -> bool:
        """True when the rule names the path or one of the folders it is in."""
        ends = _ends(self.parts, tuple(comps))
        return any(e < len(comps) or is_dir or not self.dir_only for e in ends)


def _ends(parts: tuple[str, ...], comps: tuple[str, ...]) -> set[int]:
    """The prefix lengths of ``comps`` that ``parts`` match whole (one pass over both lists)."""
    states = {0}  # how many parts are matched so far
    ends = set()
    for i in range(len(comps) + 1):
        closed = set(states)
        for s in list(closed):  # "**" may match nothing
            while s < len(parts) and parts[s] == "**":
                s += 1
                closed.add(s)
        if len(parts) in closed and i > 0:
            ends.add(i)
        if i == len(comps):
            break
        nxt = set()
        for s in closed:
            if s < len(parts):
                if parts[s] == "**":
                    nxt.add(s)
                elif glob_match(parts[s], comps[i]):
                    nxt.add(s + 1)
        states = nxt
        if not states:
            break
    return ends


class Ignore:
    """The ignore rules of one run folder."""

    def __init__(self, root: Path):
        self.rules: list[Rule] = []
        self.refused: str | None = None  # why the file gave no rules, when it is there but unusable
        try:
            data = read_capped(Path(root) / IGNORE_FILE, MAX_IGNORE_BYTES)
        except FileNotFoundError:
            return
        except OSError as e:
            self.refused = str(e)
            return
        lines = data[:MAX_IGNORE_BYTES].decode("utf-8", "replace").splitlines()
        rules = [r for line in lines if len(line) <= MAX_RULE_CHARS and (r := Rule.parse(line)) is not None]
        self.rules = rules[:MAX_RULES]

    def _ignored(self, rel: str, is_dir: bool) -> bool:
        comps = rel.split("/")
        out = False
        for rule in self.rules:
            if rule.negate == out and rule.matches(comps, is_dir):
                out = not rule.negate
        return out

    def dir_ignored(self, rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        return name in _BUILTIN_DIRS or self._ignored(rel, True)

    def file_ignored(self, rel: str) -> bool:
        name = rel.rsplit("/", 1)[-1]
        if any(fnmatch.fnmatchcase(name, p) for p in _BUILTIN_FILES):
            return True
        return rel != IGNORE_FILE and self._ignored(rel, False)

"""``check``: is every version of every run in a store whole? In the manner of ``restic check``.

It follows every ref to every version's manifest, every file's recipe and every object those
recipes name (delta bases included) and asks the store whether each is there; ``read_data``
also reads and decodes every object and checks its hash. Each problem names the key and the
runs that need it.

A version-2 push trusts a file's recipe to mean its objects are there, so ``check`` repairs what
a push can make whole again: it deletes objects proven damaged and every recipe that names a
damaged or missing object (or one whose delta base is). The next push of a run that lists such
a file then cuts it again and sends what is missing. ``repair=False`` only reports. The repair
runs under the gc lock, so no push is counting on what it removes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from aptbundle.ground.errors import AptBundleError
from aptbundle.ground.fsutil import Progress
from aptbundle.store import layout, locks, refs
from aptbundle.store.backend import Store
from aptbundle.store.maintain import run_refs
from aptbundle.store.pull import resolve
from aptbundle.store.reader import MissingObject, ObjectReader


@dataclass
class CheckResult:
    store: str
    runs: int = 0
    versions: int = 0
    recipes: int = 0
    objects: int = 0
    read_bytes: int = 0  # decoded bytes checked (with read_data)
    problems: list[dict] = field(default_factory=list)  # {"key", "what", "runs"}
    removed: list[str] = field(default_factory=list)  # keys the repair deleted
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**self.__dict__, "ok": self.ok}


def check(store_url: str | Path, *, read_data: bool = False, repair: bool = True,
          progress: Progress | None = None) -> CheckResult:
    """Check every ref, manifest, recipe and object of a store (``read_data``: every object's bytes)."""
    store = Store.existing(store_url)
    store.require(2, "check")
    res = CheckResult(store.url)
    reader = ObjectReader(store)
    with locks.collecting(store) if repair else contextlib.nullcontext() as lock:
        problems: dict[str, dict] = {}

        def problem(key: str, what: str, run: str) -> None:
            p = problems.setdefault(key, {"key": store.where(key), "what": what, "runs": []})
            if run not in p["runs"]:
                p["runs"].append(run)

        needs: dict[str, tuple[int, set[str]]] = {}  # recipe -> (size, runs)
        for name, _ in run_refs(store):
            res.runs += 1
            try:
                versions, _raw = refs.read_ref(store, name)
            except AptBundleError as e:
                problem(layout.ref(name), str(e), name)
                continue
            for v in versions:
                res.versions += 1
                try:
                    man = resolve(store, name, v.digest)[2]
                except AptBundleError as e:
                    problem(layout.manifest(v.digest), str(e), name)
                    continue
                for f in man.files:
                    needs.setdefault(f.sha256, (f.size, set()))[1].add(name)
        objects: dict[str, tuple[int, set[str], set[str]]] = {}  # object -> (size, runs, recipes)
        broken_recipes: set[str] = set()
        for sha, (size, runs) in needs.items():
            res.recipes += 1
            try:
                recipe = reader.recipe(sha, size)
            except AptBundleError as e:
                for run in runs:
                    problem(layout.recipe(sha), str(e), run)
                if not isinstance(e, MissingObject):
                    broken_recipes.add(sha)
                continue
            for p in recipe.parts:
                if p.sha256 is None:
                    continue
                for obj, n in [(p.sha256, p.size)] + [(c, p.size) for c in p.chain]:
                    o = objects.setdefault(obj, (n, set(), set()))
                    o[1].update(runs)
                    o[2].add(sha)
        broken: set[str] = set()
        damaged: set[str] = set()
        for obj, (size, runs, _recipes) in objects.items():
            if lock is not None:
                lock.refresh()
            res.objects += 1
            key = layout.object(obj)
            try:
                if read_data:
                    reader.object(obj, size)
                    res.read_bytes += size
                    if progress:
                        progress(size)
                elif not store.exists(key):
                    raise MissingObject(f"{store.where(key)}: missing", obj)
            except MissingObject as e:
                broken.add(obj)
                if e.sha256 != obj:
                    damaged.add(obj)  # its marker names a base the recipe does not: of no use
                for run in sorted(runs):
                    problem(key, "missing" if e.sha256 == obj else
                            f"damaged: its delta base {e.sha256[:16]}… is not in the store", run)
            except AptBundleError as e:
                broken.add(obj)
                damaged.add(obj)
                for run in sorted(runs):
                    problem(key, f"damaged: {str(e).removeprefix(store.where(key) + ': ')}", run)
        res.problems = sorted(problems.values(), key=lambda p: p["key"])
        if repair and (broken or broken_recipes):
            bad_recipes = broken_recipes | {r for o in broken for r in objects[o][2]}
            # objects whose delta base is broken are of no use either: gone, the next push rewrites them
            useless = damaged | {o for o, (_n, _r, rs) in objects.items() if rs & bad_recipes and o not in broken
                                 and _depends(reader, o, broken)}
            for obj in sorted(useless):
                store.delete(layout.object(obj))
                res.removed.append(store.where(layout.object(obj)))
            for sha in sorted(bad_recipes):
                store.delete(layout.recipe(sha))
                res.removed.append(store.where(layout.recipe(sha)))
    res.warnings = store.warnings
    return res


def _depends(reader: ObjectReader, obj: str, broken: set[str]) -> bool:
    try:
        return bool(set(reader.chain(obj)) & broken)
    except (OSError, AptBundleError):
        return True

"""The ``aptrun.json`` manifest: schema, validation, canonical form and the run digest.

The manifest is the run's table of contents and its commit point: a file or checkpoint exists
for aptbundle only once the manifest lists it. ``parse_manifest`` refuses anything that does not
follow format ``aptrun`` version 1; ``Manifest.digest`` names the run's content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aptbundle.ground.errors import ManifestError, UnsafePathError
from aptbundle.ground.fsutil import SpecialFile, read_capped
from aptbundle.ground.lock import is_lock_name
from aptbundle.ground.paths import check_collisions, check_name, normalize_relpath
from aptbundle.ground.temporaries import is_temp_name
from aptbundle.ground.values import DuplicateKey, finite_number, unique_keys

MANIFEST_NAME = "aptrun.json"
SIGNATURE_NAME = "aptrun.sig"  # a run's signature (``signature``): beside the manifest, never listed
FORMAT = "aptrun"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # a manifest of ~300k files; larger is refused unread
MAX_FILES = 1_000_000
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileEntry:
    """One file of the run: relative path, size in bytes, SHA-256 hex digest."""

    path: str
    size: int
    sha256: str


@dataclass
class CheckpointEntry:
    """One checkpoint: folder name under ``checkpoints/``, global step, epoch, metrics."""

    name: str
    step: int
    epoch: int | float
    metrics: dict[str, Any] = field(default_factory=dict)
    path: str | None = None  # its folder, when not checkpoints/NAME (an adopted Hugging Face run)

    @property
    def folder(self) -> str:
        """The checkpoint's folder, relative to the run."""
        return self.path or f"checkpoints/{self.name}"


@dataclass(frozen=True)
class LinkEntry:
    """A symbolic link of the run to one of its listed files (Lightning's ``last.ckpt``): ``path``
    is the link, ``target`` what it points to, relative to the link's folder. An archive carries
    regular files only; the link is made again on unpack."""

    path: str
    target: str

    def resolved(self) -> str:
        """The listed file the link points to (a run-relative path)."""
        base = self.path.rsplit("/", 1)[0] + "/" if "/" in self.path else ""
        return posixpath.normpath(base + self.target)


@dataclass
class BestInfo:
    """Which checkpoint is best, by which metric, in which direction."""

    name: str
    metric: str
    mode: str  # "min" or "max"
    value: float


@dataclass
class Manifest:
    """The parsed ``aptrun.json``. ``files`` is kept sorted by path."""

    name: str
    run_id: str
    trainer: str | None
    created_at: str
    updated_at: str
    files: list[FileEntry] = field(default_factory=list)
    checkpoints: list[CheckpointEntry] = field(default_factory=list)
    latest: str | None = None
    best: BestInfo | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    layout: str | None = None  # the framework that wrote an adopted folder (``layouts``)
    untrusted: list[str] = field(default_factory=list)  # files carried but never loaded (``trust``)
    links: list[LinkEntry] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept on round-trip
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    # -- views -------------------------------------------------------------------------------
    def file_map(self) -> dict[str, FileEntry]:
        """Files by path."""
        return {f.path: f for f in self.files}

    def checkpoint(self, name: str) -> CheckpointEntry | None:
        """The checkpoint entry called ``name``, or None."""
        for c in self.checkpoints:
            if c.name == name:
                return c
        return None

    def files_under(self, prefix: str) -> list[FileEntry]:
        """The files inside the folder ``prefix``, or the one file ``prefix`` is."""
        pre = prefix.rstrip("/") + "/"
        return [f for f in self.files if f.path == prefix or f.path.startswith(pre)]

    def files_of(self, c: CheckpointEntry) -> list[FileEntry]:
        """The files of checkpoint ``c``: its folder's, or the one file it is (a Lightning ``.ckpt``)."""
        return self.files_under(c.folder)

    def total_size(self) -> int:
        """Bytes of all listed files."""
        return sum(f.size for f in self.files)

    def select(self, which: str = "all") -> "Manifest":
        """A copy that keeps all checkpoints, or only the ``latest``, the ``best`` or the one named
        ``which`` (and what belongs to it: its files, links, untrusted marks, machine-path notes)."""
        if which == "all":
            return dataclasses.replace(self, files=list(self.files), checkpoints=list(self.checkpoints))
        if which in ("latest", "best"):
            name = self.latest if which == "latest" else (self.best.name if self.best else None)
        else:
            name = which if any(c.name == which for c in self.checkpoints) else None
            if name is None:
                raise ManifestError(f"run {self.name}: has no checkpoint {which[:80]!r} (it has"
                                    f" {', '.join(c.name for c in self.checkpoints)[:300] or 'none'});"
                                    " choose one of them, latest, best or all")
        if name is None:
            raise ManifestError(f"run {self.name}: has no {which} checkpoint; choose --checkpoints all")
        drop = {f.path for c in self.checkpoints if c.name != name for f in self.files_of(c)}
        extra = dict(self.extra)
        if isinstance(extra.get("machine_paths"), dict):
            extra["machine_paths"] = {k: v for k, v in extra["machine_paths"].items() if k not in drop}
        return dataclasses.replace(
            self, files=[f for f in self.files if f.path not in drop],
            checkpoints=[c for c in self.checkpoints if c.name == name], latest=name,
            best=self.best if self.best and self.best.name == name else None,
            links=[x for x in self.links if x.resolved() not in drop],
            untrusted=[u for u in self.untrusted if u not in drop], extra=extra)

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict in the documented key layout."""
        d: dict[str, Any] = dict(self.extra)
        d.update(
            format=self.format,
            format_version=self.format_version,
            name=self.name,
            run_id=self.run_id,
            trainer=self.trainer,
            created_at=self.created_at,
            updated_at=self.updated_at,
            files=[dataclasses.asdict(f) for f in sorted(self.files, key=lambda f: f.path)],
            checkpoints=[{k: v for k, v in dataclasses.asdict(c).items() if k != "path" or v is not None}
                         for c in sorted(self.checkpoints, key=lambda c: c.step)],
            latest=self.latest,
            best=dataclasses.asdict(self.best) if self.best else None,
            environment=self.environment,
            history=self.history,
        )
        if self.layout is not None:  # only when set: the digests of runs without them do not change
            d["layout"] = self.layout
        if self.untrusted:
            d["untrusted"] = sorted(self.untrusted)
        if self.links:
            d["links"] = [dataclasses.asdict(x) for x in sorted(self.links, key=lambda x: x.path)]
        return d

    def canonical_bytes(self) -> bytes:
        """Canonical JSON: sorted keys, UTF-8, no whitespace. What the digest is taken of."""
        return json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")

    def to_bytes(self) -> bytes:
        """The bytes written to ``aptrun.json``: sorted, indented for people, deterministic."""
        return (
            json.dumps(self.to_dict(), sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False)
            + "\n"
        ).encode("utf-8")

    def digest(self) -> str:
        """SHA-256 of the canonical JSON: names the run's content whatever the compression.

        >>> len(Manifest(name="r", run_id="x", trainer=None, created_at="t", updated_at="t").digest())
        64
        """
        return hashlib.sha256(self.canonical_bytes()).hexdigest()


def _req(d: dict, key: str, types: type | tuple, source: str, nullable: bool = False) -> Any:
    if key not in d:
        raise ManifestError(f"{source}: key {key!r} is missing; expected an aptrun manifest")
    v = d[key]
    if v is None and nullable:
        return None
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ManifestError(f"{source}: {key!r} should be {types}, found a boolean")
    if not isinstance(v, types):
        raise ManifestError(f"{source}: {key!r} should be {types}, found {type(v).__name__}")
    return v


def _reject_constant(name: str) -> Any:
    raise ManifestError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = finite_number(float(text))
    if value is None:  # 1e400 parses as inf: a number no run can have written
        raise ManifestError(f"number {text[:40]} is out of range; expected a finite number")
    return value


def parse_manifest(data: bytes, source: str = MANIFEST_NAME) -> Manifest:
    """Parse and validate manifest bytes; raise ``ManifestError`` naming ``source`` otherwise."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{source}: {len(data)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit for a manifest;"
            " refusing to read it"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{source}: not UTF-8 ({e.reason} at byte {e.start}); expected UTF-8 JSON") from None
    try:
        raw = json.loads(text, object_pairs_hook=unique_keys, parse_constant=_reject_constant,
                         parse_float=_finite)
    except (ManifestError, DuplicateKey) as e:
        raise ManifestError(f"{source}: {e} in JSON object") from None
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"{source}: not valid JSON ({e}); the manifest is damaged") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{source}: expected a JSON object, found {type(raw).__name__}")
    fmt = raw.get("format")
    if fmt != FORMAT:
        raise ManifestError(f"{source}: format is {fmt!r}; expected {FORMAT!r}. Is this an aptrun manifest?")
    ver = raw.get("format_version")
    if not isinstance(ver, int) or isinstance(ver, bool) or ver < 1:
        raise ManifestError(f"{source}: format_version is {ver!r}; expected a positive integer")
    if ver > FORMAT_VERSION:
        raise ManifestError(
            f"{source}: format_version {ver} is newer than this aptbundle reads ({FORMAT_VERSION});"
            " upgrade aptbundle"
        )
    try:
        return _from_dict(raw, source)
    except UnsafePathError as e:
        raise ManifestError(f"{source}: {e}") from None


def _from_dict(raw: dict, source: str) -> Manifest:
    name = check_name(_req(raw, "name", str, source), what="run name")
    files_raw = _req(raw, "files", list, source)
    if len(files_raw) > MAX_FILES:
        raise ManifestError(f"{source}: lists {len(files_raw)} files; at most {MAX_FILES} are accepted")
    files = []
    for i, f in enumerate(files_raw):
        where = f"{source}: files[{i}]"
        if not isinstance(f, dict):
            raise ManifestError(f"{where}: expected an object with path, size, sha256")
        norm = _entry_path(f, where, "file path")
        size = _req(f, "size", int, where)
        if size < 0:
            raise ManifestError(f"{where}: size {size} is negative")
        sha = _req(f, "sha256", str, where)
        if not _SHA256.match(sha):
            raise ManifestError(f"{where}: sha256 {sha!r} is not 64 lowercase hex digits")
        files.append(FileEntry(norm, size, sha))
    check_collisions([f.path for f in files] + [MANIFEST_NAME, SIGNATURE_NAME], what=f"{source}: file")
    if [f.path for f in files] != sorted(f.path for f in files):
        files.sort(key=lambda f: f.path)
    ckpts = []
    for i, c in enumerate(_req(raw, "checkpoints", list, source)):
        where = f"{source}: checkpoints[{i}]"
        if not isinstance(c, dict):
            raise ManifestError(f"{where}: expected an object")
        cname = check_name(_req(c, "name", str, where), what="checkpoint name")
        step = _req(c, "step", int, where)
        epoch = _req(c, "epoch", (int, float), where)
        metrics = c.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise ManifestError(f"{where}: metrics should be an object")
        folder = c.get("path")
        if folder is not None:
            if not isinstance(folder, str):
                raise ManifestError(f"{where}: path should be a string")
            folder = normalize_relpath(folder, what="checkpoint path")
        ckpts.append(CheckpointEntry(cname, step, epoch, metrics, folder))
    names = [c.name for c in ckpts]
    if len(set(names)) != len(names):
        raise ManifestError(f"{source}: a checkpoint name appears twice")
    folders = sorted(c.folder + "/" for c in ckpts)
    for a, b in zip(folders, folders[1:]):  # sorted: a folder inside another comes right after it
        if b.startswith(a):
            raise ManifestError(f"{source}: checkpoint folders {a[:-1]!r} and {b[:-1]!r} overlap; each"
                                " checkpoint owns its own folder")
    if "checkpoints/" in folders:
        raise ManifestError(f"{source}: a checkpoint claims the whole 'checkpoints' folder")
    latest = _req(raw, "latest", str, source, nullable=True)
    if latest is not None and latest not in names:
        raise ManifestError(f"{source}: latest {latest!r} is not among the checkpoints {names}")
    best_raw = _req(raw, "best", dict, source, nullable=True)
    best = None
    if best_raw is not None:
        bname = _req(best_raw, "name", str, f"{source}: best")
        if bname not in names:
            raise ManifestError(f"{source}: best {bname!r} is not among the checkpoints {names}")
        mode = _req(best_raw, "mode", str, f"{source}: best")
        if mode not in ("min", "max"):
            raise ManifestError(f"{source}: best.mode is {mode!r}; expected 'min' or 'max'")
        best = BestInfo(bname, _req(best_raw, "metric", str, f"{source}: best"), mode,
                        _req(best_raw, "value", (int, float), f"{source}: best"))
    layout = _req(raw, "layout", str, source, nullable=True) if "layout" in raw else None
    if layout is not None and not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", layout):
        raise ManifestError(f"{source}: layout {layout[:40]!r} is not a layout name")
    listed = {f.path for f in files}
    untrusted = _req(raw, "untrusted", list, source) if "untrusted" in raw else []
    if not all(isinstance(u, str) and u in listed for u in untrusted):
        raise ManifestError(f"{source}: untrusted names a file the manifest does not list")
    links = _links(raw.get("links", []), listed, source)
    known = {"format", "format_version", "name", "run_id", "trainer", "created_at", "updated_at",
             "files", "checkpoints", "latest", "best", "environment", "history", "layout", "untrusted", "links"}
    return Manifest(
        name=name,
        run_id=_req(raw, "run_id", str, source),
        trainer=_req(raw, "trainer", str, source, nullable=True),
        created_at=_req(raw, "created_at", str, source),
        updated_at=_req(raw, "updated_at", str, source),
        files=files,
        checkpoints=sorted(ckpts, key=lambda c: c.step),
        latest=latest,
        best=best,
        environment=_req(raw, "environment", dict, source),
        history=_req(raw, "history", list, source),
        layout=layout,
        untrusted=sorted(set(untrusted)),
        links=links,
        extra={k: v for k, v in raw.items() if k not in known},
        format_version=raw["format_version"],
    )


MAX_LINKS = 10_000


def _entry_path(raw: dict, where: str, what: str) -> str:
    """The ``path`` of a file or link entry: portable, NFC, and none of aptbundle's own names."""
    path = _req(raw, "path", str, where)
    norm = normalize_relpath(path, what=what)
    if norm != path:
        raise ManifestError(f"{where}: path {path!r} is not NFC-normalised")
    if norm == MANIFEST_NAME:
        raise ManifestError(f"{where}: the manifest may not list itself")
    if norm == SIGNATURE_NAME:
        raise ManifestError(f"{where}: {norm!r} is the name of the run's signature; it is never listed")
    if is_lock_name(norm) or any(is_temp_name(c) for c in norm.split("/")):
        raise ManifestError(f"{where}: {norm!r} is a name aptbundle reserves for locks and work in progress")
    return norm


def _links(raw: object, listed: set[str], source: str) -> list[LinkEntry]:
    """The links, each to a listed regular file of the run (never to another link, never out)."""
    if not isinstance(raw, list) or len(raw) > MAX_LINKS:
        raise ManifestError(f"{source}: links should be a list of at most {MAX_LINKS} objects")
    out = []
    folders = {"/".join(p.split("/")[:i]) for p in listed for i in range(1, p.count("/") + 1)}
    for i, x in enumerate(raw):
        where = f"{source}: links[{i}]"
        if not isinstance(x, dict):
            raise ManifestError(f"{where}: expected an object with path and target")
        path = _entry_path(x, where, "link path")
        target = _req(x, "target", str, where)
        if not target or target.startswith("/") or "\\" in target or "\0" in target or len(target) > 4096:
            raise ManifestError(f"{where}: target {target[:80]!r} is not a relative path inside the run")
        link = LinkEntry(path, target)
        inside_a_file = any("/".join(path.split("/")[:i]) in listed for i in range(1, path.count("/") + 1))
        if path in listed or path in folders or inside_a_file or link.resolved() not in listed:
            raise ManifestError(f"{where}: {path!r} -> {target[:80]!r} must be a new name pointing to a file the"
                                " manifest lists")
        out.append(link)
    check_collisions(list(listed) + [x.path for x in out], what=f"{source}: link")
    return sorted(out, key=lambda x: x.path)


def load_manifest(run_dir: str | Path) -> Manifest:
    """Read and validate ``RUN/aptrun.json``.

    For example::

        load_manifest("outputs/run1").latest
    """
    path = Path(run_dir) / MANIFEST_NAME
    shown = f"{Path(run_dir).name}/{MANIFEST_NAME}"
    try:
        data = read_capped(path, MAX_MANIFEST_BYTES, follow_links=False)
    except SpecialFile as e:
        raise ManifestError(f"{shown}: {str(e).split(': ', 1)[-1]}; expected the JSON manifest file") from None
    except FileNotFoundError:
        raise ManifestError(
            f"{shown}: not found; {run_dir} is not an aptbundle run (run `aptbundle init {run_dir}` to adopt it)"
        ) from None
    except IsADirectoryError:
        raise ManifestError(f"{shown}: is a folder; expected the JSON manifest file") from None
    return parse_manifest(data, shown)

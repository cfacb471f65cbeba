"""A file in a version-2 store is a recipe: its size, its SHA-256 and the parts that make it.

``cuts`` says where a file's parts lie: a safetensors file is its header and one part per
tensor; a torch zip (``torch.save``) is one part per storage entry, with the pickle and the zip's
own records between them; a DCP ``.distcp`` file one part per tensor item (each item is a
``torch.save`` of its own); any other file is one part. A part larger than ``objects.MAX_OBJECT``
is cut into pieces of that size. A part smaller than ``INLINE`` (512) bytes is kept in the recipe
itself; every other part is an object (``objects``), by the SHA-256 of its bytes, so unchanged
tensors inside a changed file (frozen layers, a LoRA's base, a shared base model across runs)
are stored once. The cuts only decide how bytes are stored: a file whose structure cannot be
read is stored as plain pieces, and every pull checks the whole file's hash anyway.

A recipe is hostile until ``parse_recipe`` checked it: the parts must add up to the size, every
name and digest must be well formed, a delta chain no longer than ``objects.MAX_CHAIN``, and a
part may not name the recipe's own file unless it is the whole file.
"""

from __future__ import annotations

import base64
import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import zstandard

from aptbundle.ground.errors import StoreError
from aptbundle.ground.values import DuplicateKey, unique_keys
from aptbundle.store.objects import MAX_CHAIN, MAX_OBJECT
from aptbundle.transfer.codec import ST_WIDTH

INLINE = 512  # parts smaller than this live in the recipe (a zip's local headers, the smallest tensors)
MAX_RECIPE = 64 << 20
MAX_PARTS = 1_000_000


@dataclass(frozen=True)
class Cut:
    """Where one part of a file lies, what it is called, and the word width of its floats."""

    name: str
    offset: int
    size: int
    width: int | None = None


@dataclass(frozen=True)
class Part:
    """One part of a recipe: kept inline, or an object (with the chain of bases its delta needs)."""

    name: str
    size: int
    sha256: str | None = None
    inline: bytes | None = None
    chain: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recipe:
    size: int
    sha256: str
    parts: tuple[Part, ...]

    def objects(self) -> list[str]:
        """Every object the file needs, delta bases included."""
        return [x for p in self.parts if p.sha256 for x in (p.sha256, *p.chain)]

    def to_bytes(self) -> bytes:
        parts = [{"name": p.name, "size": p.size, "inline": base64.b64encode(p.inline).decode()}
                 if p.inline is not None else {"name": p.name, "size": p.size, "object": p.sha256,
                                               "chain": list(p.chain)} for p in self.parts]
        body = {"format": "aptrecipe", "version": 1, "size": self.size, "sha256": self.sha256, "parts": parts}
        return zstandard.ZstdCompressor(level=3).compress(json.dumps(body, separators=(",", ":")).encode())


def _hex64(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def parse_recipe(raw: bytes, sha256: str, size: int, shown: str) -> Recipe:
    """The recipe of the file with ``sha256`` and ``size`` from its stored bytes; refuses one
    that does not describe exactly that file."""
    def bad(why: str) -> StoreError:
        return StoreError(f"{shown}: {why}; the store is damaged or crafted. `aptbundle check` names the runs"
                          " that need it; push them again")

    try:
        text = zstandard.ZstdDecompressor().decompress(raw, max_output_size=MAX_RECIPE)
        body = json.loads(text, object_pairs_hook=unique_keys)
    except (zstandard.ZstdError, ValueError, DuplicateKey, RecursionError):
        raise bad("not a recipe (zstd JSON)") from None
    if not isinstance(body, dict) or body.get("format") != "aptrecipe" or body.get("version") != 1:
        raise bad("not a recipe of a version this aptbundle reads")
    if body.get("sha256") != sha256 or body.get("size") != size:
        raise bad(f"describes another file (expected {size} bytes with SHA-256 {sha256[:16]}…)")
    parts = body.get("parts")
    if not isinstance(parts, list) or len(parts) > MAX_PARTS:
        raise bad("its parts are not a list")
    out, total = [], 0
    for p in parts:
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or len(p["name"]) > 1024 \
                or type(p.get("size")) is not int or not 0 < p["size"] <= MAX_OBJECT:
            raise bad("a part without a name or a size from 1 byte to 64 MiB")
        if "inline" in p:
            try:
                data = base64.b64decode(p["inline"], validate=True) if isinstance(p["inline"], str) else None
            except ValueError:
                data = None
            if data is None or len(data) != p["size"] or set(p) != {"name", "size", "inline"}:
                raise bad(f"part {p['name'][:80]!r} holds other bytes than its size says")
            out.append(Part(p["name"], p["size"], inline=data))
        else:
            chain = p.get("chain")
            if not _hex64(p.get("object")) or not isinstance(chain, list) or len(chain) > MAX_CHAIN \
                    or not all(_hex64(c) for c in chain) or p["object"] in chain:
                raise bad(f"part {p['name'][:80]!r} names no object, or a delta chain this version refuses")
            if p["object"] == sha256 and (len(parts) != 1 or p["size"] != size):
                raise bad("a part that names the file itself")
            out.append(Part(p["name"], p["size"], p["object"], chain=tuple(chain)))
        total += p["size"]
    if total != size:
        raise bad(f"parts that add up to {total} bytes, not the file's {size}")
    return Recipe(size, sha256, tuple(out))


# -- where a file's parts lie ------------------------------------------------------------------
def cuts(path: Path, rel: str, size: int) -> list[Cut]:
    """The parts of the file at ``path`` (``size`` bytes), in order, covering it exactly."""
    found: list[Cut] = []
    try:
        if rel.endswith(".safetensors"):
            found = _safetensors(path, size)
        elif rel.endswith(".distcp"):
            found = _distcp(path, size)
        elif size > INLINE and zipfile.is_zipfile(path):
            found = _torch_zip(path, size)
    except (OSError, ValueError, KeyError, TypeError, struct.error, zipfile.BadZipFile, RecursionError):
        found = []  # not the structure it claims: stored as plain pieces (the hash still guards it)
    return _fill(found, size)


def _safetensors(path: Path, size: int) -> list[Cut]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if not 0 < n <= min(size - 8, 100 << 20):
            return []
        header = json.loads(f.read(n))
    start = 8 + n
    out = [Cut("header", 0, start)]
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        b, e = info["data_offsets"]
        if type(b) is int and type(e) is int and 0 <= b < e and start + e <= size:
            out.append(Cut(f"t:{name}", start + b, e - b, ST_WIDTH.get(info.get("dtype"))))
    return out


def _torch_zip(path: Path, size: int) -> list[Cut]:
    out = []
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        pkl = next((i for i in zf.infolist() if i.filename.endswith("/data.pkl")), None)
        width = _width_named(zf.read(pkl) if pkl is not None and pkl.file_size < (64 << 20) else b"")
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED or "/data/" not in info.filename or info.file_size < INLINE:
                continue
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                return []
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            begin = info.header_offset + 30 + name_len + extra_len
            if begin + info.file_size <= size:
                out.append(Cut(f"z:{info.filename.split('/', 1)[-1]}", begin, info.file_size, width))
    return out


def _width_named(names: bytes) -> int | None:
    """A hint for the grouping only (never a decision about safety): the float width a pickle names."""
    if b"FloatStorage" in names or b"float32" in names:
        return 4
    if any(k in names for k in (b"BFloat16Storage", b"HalfStorage", b"bfloat16", b"float16")):
        return 2
    return None


def _distcp(path: Path, size: int) -> list[Cut]:
    """A DCP ``.distcp`` file: its items one after another, each tensor a ``torch.save`` of its own
    (a small zip); one part per tensor's storage, named by its place in the file."""
    import mmap

    out: list[Cut] = []
    budget = [4 * size + (1 << 20), size]  # what the descriptor searches may look at: a crafted file stays linear
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = end = 0
        while (pos := m.find(b"PK\x03\x04", pos)) != -1 and pos + 30 <= size and budget[0] > 0:
            flags, method = struct.unpack("<HH", m[pos + 6:pos + 10])
            (length,) = struct.unpack("<I", m[pos + 18:pos + 22])
            name_len, extra_len = struct.unpack("<HH", m[pos + 26:pos + 30])
            name = m[pos + 30:pos + 30 + name_len]
            begin = pos + 30 + name_len + extra_len
            if method == 0 and flags & 8 and b"/data/" in name:  # streamed: the size follows the bytes
                length = _described(m, begin, size, budget)
            if method == 0 and b"/data/" in name and INLINE <= length < 0xFFFFFFFF and begin + length <= size:
                out.append(Cut(f"item:{len(out)}", begin, length, _width_named(m[end:pos])))
                pos = end = begin + length
            else:
                pos += 4
    return out if budget[0] > 0 else []


def _described(m, begin: int, size: int, budget: list[int]) -> int:
    """The length of a zip entry written as a stream: up to the data descriptor whose size field
    says so (the signature may also occur inside the bytes); 0 when there is none. What it looks
    at is taken from ``budget`` (``[bytes left, where no descriptor follows]``)."""
    at = begin
    while at < budget[1]:
        q = m.find(b"PK\x07\x08", at)
        budget[0] -= (q if q != -1 else size) - at + 4
        if q == -1:
            budget[1] = at  # nothing from here on: later entries need not look again
            return 0
        if budget[0] < 0 or q + 24 > size:
            return 0
        n = q - begin
        if struct.unpack("<I", m[q + 8:q + 12])[0] == n or struct.unpack("<Q", m[q + 8:q + 16])[0] == n:
            return n
        at = q + 1
    return 0


def _fill(found: list[Cut], size: int) -> list[Cut]:
    """``found`` sorted, overlaps dropped, the gaps filled, and large parts cut into pieces."""
    out: list[Cut] = []
    pos = 0
    for c in sorted(found, key=lambda c: c.offset):
        if c.offset < pos:
            continue  # overlapping (a crafted header): the bytes are in the part before
        if c.offset > pos:
            out.append(Cut(f"gap@{pos}", pos, c.offset - pos))
        out.append(c)
        pos = c.offset + c.size
    if pos < size:
        out.append(Cut("rest" if out else "file", pos, size - pos))
    pieces = []
    for c in out:
        if c.size <= MAX_OBJECT:
            pieces.append(c)
            continue
        for k, off in enumerate(range(0, c.size, MAX_OBJECT)):
            n = min(MAX_OBJECT, c.size - off)
            pieces.append(Cut(f"{c.name}#{k}", c.offset + off, n, c.width if c.width and n % c.width == 0 else None))
    return pieces


class Cutter:
    """A tap over a file's bytes that hands each part, whole, to ``take(cut, bytes)``."""

    def __init__(self, parts: list[Cut], take: Callable[[Cut, bytes], None]):
        self.parts, self.take = parts, take
        self.i = 0
        self.buf = bytearray()

    def __call__(self, block: memoryview) -> None:
        pos = 0
        while pos < len(block) and self.i < len(self.parts):
            cut = self.parts[self.i]
            n = min(cut.size - len(self.buf), len(block) - pos)
            self.buf += block[pos:pos + n]
            pos += n
            if len(self.buf) == cut.size:
                data, self.buf = bytes(self.buf), bytearray()
                self.i += 1
                self.take(cut, data)

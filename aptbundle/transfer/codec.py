"""The ``--dense`` codec: byte grouping of float tensors before zstd, losslessly.

A float's bytes differ in kind: the sign and exponent byte repeats a few values, the low mantissa
bytes are noise. Written as they come, zstd sees the two interleaved and compresses neither
well. Byte grouping (the technique behind ZipNN) rewrites each block of ``UNIT`` bytes as all
first bytes of its W-byte words, then all second bytes, and so on, so the exponent bytes form
long, very compressible runs. It is a permutation: sizes are unchanged and ``ungroup`` restores
the exact bytes, which is what the manifest's hashes cover. W is 4 for fp32, 2 for fp16/bf16.

This module is also the only one that knows how the codec is marked in an archive: the
manifest member carries ``APTBUNDLE.requires=dense`` and each grouped member
``APTBUNDLE.dense=W`` (pax records). ``archive_records``/``member_records`` write them;
``check_archive_records`` and ``member_decoder`` read them back and refuse what they do not
know.
"""

from __future__ import annotations

import json
import os
import struct
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aptbundle.format.scan import scan_file
from aptbundle.format.stream import RawRead
from aptbundle.ground.errors import ArchiveError

UNIT = 4 << 20  # a multiple of every width; the unit the codec works on
MIN_SIZE = 64 << 10  # smaller files are not worth it
PAX_WIDTH = "APTBUNDLE.dense"
PAX_REQUIRES = "APTBUNDLE.requires"

ST_WIDTH = {"F32": 4, "F16": 2, "BF16": 2}  # safetensors dtypes the grouping applies to


@dataclass(frozen=True)
class Encoding:
    """How a run's bytes are compressed on their way into an archive or a store."""

    level: int  # zstd level, 1 to 22
    threads: int  # zstd worker threads
    dense: bool  # byte-group float tensors first (``Grouping``)

    @classmethod
    def choose(cls, level: int | None = None, threads: int = 0, dense: bool = False) -> "Encoding":
        """The defaults filled in: level 3, or 1 with ``dense`` (grouped floats compress as well
        at level 1 and twice as fast); ``threads=0`` uses every core."""
        level = level if level is not None else (1 if dense else 3)
        if not 1 <= level <= 22:
            raise ArchiveError(f"--level {level}: expected a zstd level from 1 to 22")
        return cls(level, threads if threads > 0 else (os.cpu_count() or 1), dense)


def _np():
    import numpy  # only archives that use the codec pay for importing numpy

    return numpy


def _word(width: int):
    return _np().dtype("<u2" if width == 2 else "<u4")


def group(block: bytes | memoryview, width: int) -> bytes:
    """Bytes of ``block`` grouped by significance (a trailing partial word stays in place)."""
    np, word = _np(), _word(width)
    n = len(block) // width * width
    words = np.frombuffer(block, dtype=word, count=n // width)
    out = np.empty((width, n // width), dtype=np.uint8)
    for i in range(width):  # shifts over whole words: several times faster than a byte transpose
        out[i] = words >> word.type(8 * i)  # a typed shift: a Python int is 10x slower
    return out.tobytes() + bytes(block[n:])


def ungroup(block: bytes | memoryview, width: int) -> bytes:
    """The inverse of ``group`` for one block."""
    np, word = _np(), _word(width)
    n = len(block) // width * width
    planes = np.frombuffer(block, dtype=np.uint8, count=n).reshape(width, -1)
    words = planes[0].astype(word)
    for i in range(1, width):
        words |= planes[i].astype(word) << word.type(8 * i)
    return words.tobytes() + bytes(block[n:])


def _safetensors_width(path: Path) -> int | None:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    by_width: dict[int, int] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        w = ST_WIDTH.get(info.get("dtype"))
        b, e = info["data_offsets"]
        by_width[w or 0] = by_width.get(w or 0, 0) + (e - b)
    best = max(by_width, key=by_width.get, default=0)
    return best or None


def dense_width(path: Path, rel: str, size: int) -> int | None:
    """The word width to group a file by, or None to store it as it is."""
    if size < MIN_SIZE:
        return None
    if rel.endswith(".safetensors"):
        return _safetensors_width(path)
    if rel.endswith((".pt", ".pth", ".bin")):
        try:
            names = scan_file(path, rel)
        except Exception:
            return None
        if "torch.FloatStorage" in names or "torch.float32" in names:
            return 4
        if {"torch.BFloat16Storage", "torch.HalfStorage", "torch.bfloat16", "torch.float16"} & set(names):
            return 2
    return None


class Ungrouper:
    """Stream adapter: takes grouped bytes in any chunking, yields the original bytes."""

    def __init__(self, width: int, size: int):
        self.width, self.left = width, size
        self.buf = bytearray(min(UNIT, size))
        self.view = memoryview(self.buf)
        self.fill = 0

    def feed(self, data: bytes) -> list[bytes]:
        out = []
        pos = 0
        while pos < len(data):
            take = min(len(self.buf) - self.fill, len(data) - pos)
            self.view[self.fill:self.fill + take] = data[pos:pos + take]
            self.fill += take
            self.left -= take
            pos += take
            if self.fill == len(self.buf) or self.left == 0:
                out.append(ungroup(self.view[:self.fill], self.width))
                self.fill = 0
        return out


class Grouping:
    """A tap that byte-groups a file in codec blocks before handing it on (to a compressor)."""

    def __init__(self, width: int, write):
        self.width, self.write, self.buf = width, write, bytearray()

    def __call__(self, block: memoryview) -> None:
        self.buf += block
        while len(self.buf) >= UNIT:
            self.write(group(memoryview(self.buf)[:UNIT], self.width))
            del self.buf[:UNIT]

    def flush(self) -> None:
        if self.buf:
            self.write(group(bytes(self.buf), self.width))
            self.buf.clear()


# -- how the codec is marked in an archive -------------------------------------------------
def archive_records(dense: bool) -> dict[str, str] | None:
    """The pax records of the manifest member: what the archive needs beyond plain tar."""
    return {PAX_REQUIRES: "dense"} if dense else None


def member_records(width: int | None) -> dict[str, str] | None:
    """The pax records of one member: its word width when it is grouped."""
    return {PAX_WIDTH: str(width)} if width else None


def check_archive_records(pax: dict[str, str], shown: str) -> str | None:
    """What the archive requires (None or "dense"); refuses records of a newer aptbundle."""
    unknown = sorted(k for k in pax if k.startswith("APTBUNDLE.") and k != PAX_REQUIRES)
    if unknown or pax.get(PAX_REQUIRES, "dense") != "dense":
        raise ArchiveError(f"{shown}: needs archive features this aptbundle does not know"
                           f" ({unknown or pax[PAX_REQUIRES]}); upgrade aptbundle")
    return pax.get(PAX_REQUIRES)


def member_decoder(pax: dict[str, str], requires: str | None, size: int, shown: str,
                   name: str) -> Callable[[RawRead], RawRead] | None:
    """For a member marked as grouped, a transform from its stored bytes to the original ones.

    Returns None for a member stored as it is; refuses records it does not know.
    """
    width = pax.get(PAX_WIDTH)
    unknown = sorted(k for k in pax if k.startswith("APTBUNDLE.") and k != PAX_WIDTH)
    if unknown or (width is not None and (width not in ("2", "4") or requires != "dense")):
        raise ArchiveError(f"{shown}: member {name!r} has aptbundle records {unknown or width!r} this"
                           " version does not know; upgrade aptbundle")
    if width is None:
        return None
    return lambda raw: ungrouping(raw, int(width), size)


def ungrouping(raw: RawRead, width: int, size: int) -> RawRead:
    """A reader of the original bytes over ``raw``, a reader of grouped ones."""
    ug = Ungrouper(width, size)
    pending: deque = deque()

    def read(n: int) -> bytes:
        while not pending:
            b = raw(UNIT)
            if not b:
                return b""
            pending.extend(ug.feed(b))
        piece = pending.popleft()
        if len(piece) > n:
            pending.appendleft(piece[n:])
            piece = piece[:n]
        return piece

    return read

"""The ``--dense`` codec: byte grouping of float tensors before zstd, losslessly.

A float's bytes differ in kind: the sign and exponent byte repeats a few values, the low mantissa
bytes are noise. Written as they come, zstd sees the two interleaved and compresses neither
well. Byte grouping (the technique behind ZipNN) rewrites each block of ``BLOCK`` bytes as all
first bytes of its W-byte words, then all second bytes, and so on, so the exponent bytes form
long, very compressible runs. It is a permutation: sizes are unchanged and ``ungroup`` restores
the exact bytes, which is what the manifest's hashes cover. W is 4 for fp32, 2 for fp16/bf16.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

BLOCK = 4 << 20  # a multiple of every width; the unit the codec works on
MIN_SIZE = 64 << 10  # smaller files are not worth it
PAX_WIDTH = "APTBUNDLE.dense"
PAX_REQUIRES = "APTBUNDLE.requires"

_ST_WIDTH = {"F32": 4, "F16": 2, "BF16": 2}


_WORD = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def group(block: bytes | memoryview, width: int) -> bytes:
    """Bytes of ``block`` grouped by significance (a trailing partial word stays in place)."""
    n = len(block) // width * width
    words = np.frombuffer(block, dtype=_WORD[width], count=n // width)
    out = np.empty((width, n // width), dtype=np.uint8)
    for i in range(width):  # shifts over whole words: several times faster than a byte transpose
        out[i] = words >> _WORD[width].type(8 * i)  # a typed shift: a Python int is 10x slower
    return out.tobytes() + bytes(block[n:])


def ungroup(block: bytes | memoryview, width: int) -> bytes:
    """The inverse of ``group`` for one block."""
    n = len(block) // width * width
    planes = np.frombuffer(block, dtype=np.uint8, count=n).reshape(width, -1)
    words = planes[0].astype(_WORD[width])
    for i in range(1, width):
        words |= planes[i].astype(_WORD[width]) << _WORD[width].type(8 * i)
    return words.tobytes() + bytes(block[n:])


def _safetensors_width(path: Path) -> int | None:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    by_width: dict[int, int] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        w = _ST_WIDTH.get(info.get("dtype"))
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
        from aptbundle.scan import scan_torch_file

        try:
            names = scan_torch_file(path, rel)
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
        self.buf = bytearray(min(BLOCK, size))
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

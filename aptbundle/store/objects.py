"""A store's objects: one tensor, storage entry, header or small file each, by the SHA-256 of its bytes.

An object is a zstd *skippable* frame that says how it is encoded, then zstd frames (so every
object stays a valid ``.zst`` file, which ``zstd -d`` turns into the stored form)::

    aptobj1 ENC SIZE BASE DEPTH

- ``z``: one zstd frame of the bytes.
- ``g2``/``g4``: *grouped*: the bytes of each 2- or 4-byte word split into planes (all first
  bytes, then all second bytes...), one zstd frame per plane. A float's sign and exponent byte
  repeats a few values and its low mantissa bytes are noise: apart, zstd compresses the first
  and stores the others raw, which it also decodes at memory speed.
- ``x2``/``x4``: an XOR *delta* against ``BASE``, the object of the same tensor in the run's
  previous checkpoint (same size), grouped as above. Between nearby checkpoints most high bits
  of a weight stay put, so the XOR's high planes are nearly all zero. ``DEPTH`` is the length of
  the chain of bases below it, at most ``MAX_CHAIN``: a full object every few checkpoints keeps
  a restore's work, and the damage one lost object can do, bounded.

``encode`` tries what applies and keeps the smallest. ``decode`` is strict: the marker must be
one this version writes, every frame must declare its content size, the planes must add up to
``SIZE``, nothing may follow the last frame, a delta's base must be of the same size and the
chain no deeper than ``MAX_CHAIN`` (a crafted loop ends there), and the decoded bytes must hash
to the object's name.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Callable

import numpy as np
import zstandard

from aptbundle.ground.errors import StoreError

SKIPPABLE = 0x184D2A5A
MAGIC = b"aptobj1"
MAX_OBJECT = 64 << 20  # a tensor larger than this is cut into objects of this size
MAX_CHAIN = 4  # deltas on deltas: a full object at least every fifth checkpoint (see the docstring)
MIN_GROUP = 4096  # smaller floats are not worth planes
SAMPLE = 256 << 10  # bytes of each candidate compressed to choose between them
_HEAD = 8 + 160


@dataclass(frozen=True)
class Header:
    """What an object's marker says."""

    enc: str  # "z", "g2", "g4", "x2", "x4"
    size: int  # bytes of the decoded object
    base: str | None  # the object a delta is against
    depth: int  # deltas below this one (0 for a full object)

    @property
    def width(self) -> int:
        return int(self.enc[1:]) if self.enc != "z" else 0


def _planes(data: bytes | memoryview, width: int) -> np.ndarray:
    return np.ascontiguousarray(np.frombuffer(data, dtype=np.uint8).reshape(-1, width).T)


def _frames(planes: np.ndarray, cctx: zstandard.ZstdCompressor) -> list[bytes]:
    return [cctx.compress(memoryview(p)) for p in planes]


def encode(data: bytes | memoryview, width: int | None, base: tuple[str, bytes, int] | None,
           level: int = 1) -> tuple[bytes, Header]:
    """The smallest encoding of ``data`` that applies: grouped (and a delta against ``base``,
    ``(sha, bytes, depth)``) for floats of ``width`` bytes, else plain zstd."""
    n = len(data)
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
    groupable = width in (2, 4) and n >= MIN_GROUP and n % width == 0
    if not groupable:
        head = Header("z", n, None, 0)
        return marker(head) + cctx.compress(data), head
    options = [(_planes(data, width), Header(f"g{width}", n, None, 0))]
    if base is not None and len(base[1]) == n and base[2] < MAX_CHAIN:
        word = np.uint16 if width == 2 else np.uint32
        x = np.bitwise_xor(np.frombuffer(data, dtype=word), np.frombuffer(base[1], dtype=word))
        options.append((_planes(x.view(np.uint8), width), Header(f"x{width}", n, base[0], base[2] + 1)))
    if len(options) > 1 and n > 16 * SAMPLE:  # large: judge on samples, compress the winner alone
        def sampled(planes: np.ndarray) -> int:
            step = planes.shape[1] // 4
            return sum(len(cctx.compress(memoryview(p[k * step:k * step + SAMPLE // 4])))
                       for p in planes for k in range(4))

        options = [min(options, key=lambda o: sampled(o[0]))]
    encoded = [(_frames(planes, cctx), head) for planes, head in options]
    frames, head = min(encoded, key=lambda o: sum(len(f) for f in o[0]))
    return marker(head) + b"".join(frames), head


def marker(head: Header) -> bytes:
    text = b"%s %s %d %s %d" % (MAGIC, head.enc.encode(), head.size, (head.base or "-").encode(), head.depth)
    return struct.pack("<II", SKIPPABLE, len(text)) + text


def parse_header(raw: bytes, shown: str) -> tuple[Header, int]:
    """The marker at the start of ``raw`` and where the frames begin; refuses anything else."""
    bad = StoreError(f"{shown}: does not start with an object marker this version writes; the store is"
                     " damaged or crafted (or written by a newer aptbundle: upgrade it)")
    if len(raw) < 8:
        raise bad
    magic, n = struct.unpack("<II", raw[:8])
    if magic != SKIPPABLE or not 8 < n <= 160 or len(raw) < 8 + n:
        raise bad
    fields = raw[8:8 + n].split(b" ")
    if len(fields) != 5 or fields[0] != MAGIC or fields[1] not in (b"z", b"g2", b"g4", b"x2", b"x4") \
            or not fields[2].isdigit() or not fields[4].isdigit() or len(fields[2]) > 12:
        raise bad
    enc, size, depth = fields[1].decode(), int(fields[2]), int(fields[4])
    base = fields[3].decode("ascii", "replace")
    is_delta = enc.startswith("x")
    if size > MAX_OBJECT or (is_delta != (base != "-")) or (is_delta and not 1 <= depth <= MAX_CHAIN) \
            or (not is_delta and depth != 0) or (is_delta and not _is_hex64(base)):
        raise bad
    return Header(enc, size, base if is_delta else None, depth), 8 + n


def _is_hex64(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def decode(sha: str, raw: bytes, shown: str, base_of: Callable[[str, int, int], bytes | memoryview],
           verify: bool = True) -> bytes | memoryview:
    """The bytes of object ``sha`` from its stored form ``raw``.

    ``base_of(base_sha, size, depth)`` returns a delta's base, decoded (the caller bounds the
    chain by ``depth``). With ``verify`` the result is checked against ``sha`` (a pull, which
    hashes every file end to end, leaves it to that).
    """
    head, pos = parse_header(raw, shown)
    frames = memoryview(raw)[pos:]
    width = head.width
    count = width or 1
    each = head.size // count
    if width and head.size % width:
        raise StoreError(f"{shown}: {head.size} bytes do not split into {width}-byte words; the store is damaged"
                         " or crafted")
    dctx = zstandard.ZstdDecompressor()
    planes = []
    for _ in range(count):
        declared = zstandard.frame_content_size(frames) if len(frames) >= 4 else -1
        if declared != each:
            raise StoreError(f"{shown}: a frame of {declared} bytes where {each} belong; the store is damaged"
                             " or crafted")
        obj = dctx.decompressobj()
        try:
            plane = obj.decompress(frames)
        except zstandard.ZstdError as e:
            raise StoreError(f"{shown}: corrupt zstd data ({e}); the store is damaged") from None
        if len(plane) != each or not obj.eof:
            raise StoreError(f"{shown}: a frame that decodes to {len(plane)} bytes, not {each}; the store is damaged")
        planes.append(plane)
        frames = frames[len(frames) - len(obj.unused_data):]
    if len(frames):
        raise StoreError(f"{shown}: {len(frames)} bytes after its last frame; the store is damaged or crafted")
    if width:
        out = np.empty(head.size, dtype=np.uint8)
        words = out.reshape(-1, width)
        for i, p in enumerate(planes):  # one strided pass per plane: numpy's fastest interleave
            words[:, i] = np.frombuffer(p, dtype=np.uint8)
        if head.base is not None:
            base = base_of(head.base, head.size, head.depth - 1)
            if len(base) != head.size:
                raise StoreError(f"{shown}: a delta against {head.base[:16]}… of {len(base)} bytes, not"
                                 f" {head.size}; the store is damaged or crafted")
            word = np.uint16 if width == 2 else np.uint32
            np.bitwise_xor(out.view(word), np.frombuffer(base, dtype=word), out=out.view(word))
        data: bytes | memoryview = memoryview(out)
    else:
        data = planes[0]
    if verify and hashlib.sha256(data).hexdigest() != sha:
        raise StoreError(f"{shown}: decodes to bytes whose SHA-256 is not the object's name; the store is damaged")
    return data


def head_bytes() -> int:
    """How many bytes of an object hold its marker (what ``parse_header`` needs)."""
    return _HEAD

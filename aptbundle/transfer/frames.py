"""One zstd frame, byte-exact, and nothing after it: what an archive and a store blob both are.

``FrameGuard`` hands zstd exactly the bytes of one frame and refuses whatever follows (trailing
bytes, a second or skippable frame), so nothing is read that the checks did not see.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from aptbundle.ground.errors import ArchiveError


class FrameGuard:
    """A raw-stream wrapper that passes one zstd frame, byte-exact, and nothing after it.

    zstd is given only the frame's bytes; ``finish()`` then checks that the file ends there, so
    trailing bytes, skippable frames and second frames are refused instead of silently read.
    The frame's bytes pass through unchanged: the guard walks the block headers inside each
    large block it reads from the source and hands out whole validated stretches as views, so
    it copies nothing and costs little next to the decompression.
    """

    def __init__(self, raw: BinaryIO, label: str, chunk: int = 1 << 20):
        self.raw, self.label, self.chunk = raw, label, chunk
        self._buf = b""  # bytes read from the source
        self._pos = 0  # next byte of _buf to hand out
        self._ok = 0  # bytes of _buf before this are checked frame bytes
        self._payload = 0  # block payload bytes still to check
        self._state = "magic"  # magic -> block -> (checksum) -> done
        self._last = False
        self._checksum = False
        self.consumed = 0

    def _bad(self, what: str) -> ArchiveError:
        return ArchiveError(f"{self.label}: {what}")

    def _walk(self) -> None:
        """Advance ``_ok`` over every structure that lies wholly in the buffer."""
        buf = self._buf
        while True:
            if self._payload:
                take = min(self._payload, len(buf) - self._ok)
                self._ok += take
                self._payload -= take
                if self._payload:
                    return
            avail = len(buf) - self._ok
            if self._state == "magic":
                if avail < 5:
                    return
                if buf[self._ok:self._ok + 4] != b"\x28\xb5\x2f\xfd":
                    raise self._bad(f"not a zstd stream (starts with {buf[self._ok:self._ok + 4].hex()});"
                                    " expected NAME.aptrun.tar.zst")
                fhd = buf[self._ok + 4]
                if fhd & 0x08:
                    raise self._bad("zstd frame header has a reserved bit set; corrupt")
                single = (fhd >> 5) & 1
                size = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + (single, 2, 4, 8)[fhd >> 6]
                if avail < size:
                    return
                self._checksum = bool(fhd & 0x04)
                self._ok += size
                self._state = "block"
            elif self._state == "block":
                if self._last:
                    self._state = "checksum" if self._checksum else "done"
                    continue
                if avail < 3:
                    return
                v = int.from_bytes(buf[self._ok:self._ok + 3], "little")
                self._last, btype, bsize = bool(v & 1), (v >> 1) & 3, v >> 3
                if btype == 3:
                    raise self._bad("zstd block of reserved type; the archive is corrupt")
                self._ok += 3
                self._payload = 1 if btype == 1 else bsize
            elif self._state == "checksum":
                if avail < 4:
                    return
                self._ok += 4
                self._state = "done"
            else:
                return

    def read(self, n: int = -1) -> bytes | memoryview:
        n = self.chunk if n is None or n < 0 else n
        while True:
            self._walk()
            if self._ok > self._pos:
                end = min(self._ok, self._pos + n)
                out = memoryview(self._buf)[self._pos:end]
                self._pos = end
                self.consumed += len(out)
                return out
            if self._state == "done":
                return b""
            more = self.raw.read(self.chunk)
            if not more:
                raise self._bad("the zstd stream is truncated; the archive is incomplete")
            rest = self._buf[self._pos:]  # a header cut by the block boundary: a few bytes
            self._buf = bytes(rest) + more if rest else more
            self._pos = self._ok = 0

    def finish(self) -> None:
        """Refuse anything after the frame: trailing bytes or extra (or skippable) frames."""
        while self._state != "done":
            if not len(self.read(1 << 20)):
                break
        extra = bytes(self._buf[self._pos:self._pos + 4])
        if len(extra) < 4:
            extra += self.raw.read(4 - len(extra))
        if extra:
            kind = "another zstd frame" if extra in (b"\x28\xb5\x2f\xfd",) or (
                len(extra) == 4 and struct.unpack("<I", extra)[0] & 0xFFFFFFF0 == 0x184D2A50) else "trailing bytes"
            raise self._bad(f"{kind} after the archive's zstd frame; expected the file to end there")

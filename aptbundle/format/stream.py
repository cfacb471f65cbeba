"""One file's bytes, read once: hashed, copied and scanned in the same pass.

``Stream`` pulls large blocks from a source (a file on disk, a member of an archive) and hands
each block to its taps (SHA-256, the file being unpacked, a progress bar) exactly once, in
order. Parsers (the pickle, zip and safetensors checks of ``scan``) read what they need from
its buffer with small reads, peeks and skips without a second pass over the data; ``drain``
then pulls the rest through the taps. Memory stays at one block plus what a parser asks for.
"""

from __future__ import annotations

import struct
from typing import Callable

from aptbundle.ground.fsutil import BLOCK

RawRead = Callable[[int], bytes]  # returns 1..n bytes, or b"" at the end


def file_source(f) -> RawRead:
    """Read an open binary file into one reused block: no allocation per block.

    What it returns is valid until the next call; ``Stream`` hands it to its taps at once and
    copies only what a parser keeps.
    """
    view = memoryview(bytearray(BLOCK))

    def read(n: int) -> memoryview:
        return view[:f.readinto(view[:min(n, BLOCK)])]

    return read


class Stream:
    """At most ``size`` bytes of ``raw``; ``taps`` see every byte once, as it is pulled."""

    def __init__(self, raw: RawRead, size: int, taps: list[Callable[[memoryview], None]] | None = None):
        self._raw = raw
        self.size = size
        self.taps = list(taps or [])
        self._buf = bytearray()
        self._pos = 0  # read position inside _buf
        self.pulled = 0  # bytes taken from the source
        self.short = False  # the source ended before ``size`` bytes
        self.grew = False  # the source had more than ``size`` bytes (checked by ``drain``)

    # -- the source side -------------------------------------------------------------------
    def _pull(self, keep: bool = True) -> bool:
        """Take one more block from the source, through the taps, into the buffer if ``keep``;
        False at the end."""
        left = self.size - self.pulled
        if left <= 0:
            return False
        b = self._raw(min(BLOCK, left))
        if not b:
            self.short = True
            return False
        self.pulled += len(b)
        view = memoryview(b)
        for tap in self.taps:
            tap(view)
        if not keep:
            return True
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += b
        return True

    def _have(self, n: int) -> int:
        while len(self._buf) - self._pos < n and self._pull():
            pass
        return len(self._buf) - self._pos

    # -- the parser side -------------------------------------------------------------------
    def tell(self) -> int:
        """Bytes consumed by parsers so far (the offset of the next read)."""
        return self.pulled - (len(self._buf) - self._pos)

    def buffered(self, at_least: int = 0) -> int:
        """Bytes readable without pulling, after pulling until there are ``at_least`` (or the end)."""
        return self._have(at_least)

    def find(self, sub: bytes, start: int, end: int) -> int:
        """Offset from the read position of ``sub`` in the buffered bytes [start, end), or -1."""
        i = self._buf.find(sub, self._pos + start, self._pos + end)
        return i - self._pos if i >= 0 else -1

    def unpack_from(self, fmt: str, offset: int) -> tuple:
        """``struct.unpack_from`` at ``offset`` from the read position (bytes must be buffered)."""
        return struct.unpack_from(fmt, self._buf, self._pos + offset)

    def peek(self, n: int) -> bytes:
        """Up to ``n`` next bytes, without consuming them."""
        have = self._have(n)
        return bytes(self._buf[self._pos:self._pos + min(n, have)])

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (fewer only at the end)."""
        if n is None or n < 0:
            n = self.size
        have = self._have(n)
        out = bytes(self._buf[self._pos:self._pos + min(n, have)])
        self._pos += len(out)
        return out

    def readline(self) -> bytes:
        """Bytes up to and including the next newline (for text opcodes of a pickle)."""
        parts = []
        while True:
            have = self._have(1)
            if not have:
                return b"".join(parts)
            i = self._buf.find(b"\n", self._pos)
            if i >= 0:
                parts.append(bytes(self._buf[self._pos:i + 1]))
                self._pos = i + 1
                return b"".join(parts)
            parts.append(bytes(self._buf[self._pos:]))
            self._pos = len(self._buf)
            if sum(map(len, parts)) > (1 << 20):
                return b"".join(parts)  # a text line this long is not a pickle's: let the parser refuse it

    def skip(self, n: int) -> int:
        """Consume up to ``n`` bytes without keeping them; returns how many were skipped."""
        done = min(n, len(self._buf) - self._pos)
        self._pos += done
        while n - done >= BLOCK and self.size - self.pulled >= BLOCK:  # whole blocks: to the taps only
            before = self.pulled
            if not self._pull(keep=False):
                return done
            done += self.pulled - before
        while done < n and self._have(1):
            take = min(len(self._buf) - self._pos, n - done)
            self._pos += take
            done += take
        return done

    def drain(self) -> None:
        """Pull the rest of the ``size`` bytes through the taps, then see whether the source grew."""
        self._buf.clear()
        self._pos = 0
        while self._pull(keep=False):
            pass
        if not self.short and self.pulled == self.size:
            self.grew = bool(self._raw(1))

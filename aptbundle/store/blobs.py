"""A version-1 store's blobs (read only; ``store upgrade`` converts them): one file's bytes, zstd.

A blob is one zstd frame. A blob written with ``--dense`` (byte-grouped floats, see
``transfer.codec``) starts with a zstd *skippable* frame that says so (``aptbundle:dense=4``),
which ``zstd -d`` passes over: every blob stays a valid ``.zst`` file. Reading a blob is as
strict as reading an archive: exactly one frame after the optional marker, no more output than
the manifest declares (a decompression bomb is cut off), and the bytes hashed and scanned
(``verify.check_stream``) as they stream to their destination.
"""

from __future__ import annotations

import struct
from typing import Callable

import zstandard

from aptbundle.transfer.codec import ungrouping
from aptbundle.ground.fsutil import BLOCK
from aptbundle.transfer.frames import FrameGuard
from aptbundle.format.manifest import FileEntry
from aptbundle.format.verify import check_stream
from aptbundle.ground.ahead import ReadAhead
from aptbundle.ground.errors import AptBundleError, StoreError
from aptbundle.ground.problems import Kind, Problem
from aptbundle.store import layout
from aptbundle.store.backend import Store

SKIPPABLE = 0x184D2A5A  # one of zstd's sixteen skippable-frame magics
MARK = b"aptbundle:dense="


def read_blob(store: Store, entry: FileEntry, taps: list[Callable[[memoryview], None]]) -> list[Problem]:
    """Stream the blob of ``entry`` through the checks into ``taps``; the problems found."""
    key = layout.blob(entry.sha256)
    shown = store.where(key)
    try:
        raw = store.open(key, ahead=True)
    except FileNotFoundError:
        return [Problem(entry.path, Kind.MISSING, f"blob {key}", "not in the store (the manifest names a missing blob)")]
    dec = None
    try:
        width = _marker(raw, shown)
        guard = FrameGuard(raw, shown)
        reader = zstandard.ZstdDecompressor().stream_reader(guard, read_size=BLOCK, read_across_frames=False,
                                                             closefd=False)
        dec = ReadAhead(lambda: reader.read(BLOCK), 4, "unzstd")  # decompress beside the hashing
        seen = 0

        def read(n: int) -> bytes:
            nonlocal seen
            b = dec.read(n)
            seen += len(b)
            if seen > entry.size:  # more than the manifest declares: stop before it piles up
                raise _TooLong
            return b

        source = ungrouping(read, width, entry.size) if width else read
        try:
            problems = check_stream(source, entry, taps=taps)
            if not problems and dec.read(1):
                raise _TooLong
        except _TooLong:
            return [Problem(entry.path, Kind.SIZE, f"{entry.size} bytes", f"a blob that decompresses to more ({key})")]
        except zstandard.ZstdError as e:
            return [Problem(entry.path, Kind.BLOB, "a valid zstd blob", f"corrupt zstd data in {key} ({e})")]
        if not problems:
            dec.close()
            guard.finish()
        return problems
    except AptBundleError as e:
        return [Problem(entry.path, Kind.BLOB, f"a valid blob {key}", str(e).removeprefix(f"{shown}: "))]
    finally:
        if dec is not None:
            dec.close()
        raw.close()


class _TooLong(Exception):
    """A blob that decompresses to more than its entry's size."""


def _marker(raw, shown: str) -> int | None:
    """Read the optional dense marker at the blob's start; the word width it names, or None.

    Leaves ``raw`` at the zstd frame (the guard then refuses anything that is not one).
    """
    head = b""
    while len(head) < 8 and (more := raw.read(8 - len(head))):
        head += more
    if len(head) == 8 and struct.unpack("<I", head[:4])[0] == SKIPPABLE:
        (n,) = struct.unpack("<I", head[4:])
        mark = raw.read(n) if n <= 64 else b""
        if not mark.startswith(MARK) or mark[len(MARK):] not in (b"2", b"4"):
            raise StoreError(f"{shown}: starts with an aptbundle marker this version does not know; upgrade"
                             " aptbundle, or the blob is damaged")
        return int(mark[len(MARK):])
    if hasattr(raw, "unread"):  # a prefetching reader cannot seek back
        raw.unread(head)
    else:
        raw.seek(0)
    return None

"""Static content checks: refuse files that would run code or read out of bounds if loaded.

Every check reads the file once, front to back, from a ``Stream`` (so the same pass also
hashes it, and an archive member is scanned while it streams, with nothing written to disk):

- a ``torch.save`` zip is walked entry by entry; every ``*.pkl`` entry is walked as a pickle
  (``pickles``), and the central directory at the end must describe exactly the entries that
  were walked, so ``torch.load`` cannot be pointed at bytes the scan did not see;
- a legacy (non-zip) ``torch.save`` file: each of its five pickles is walked;
- a DCP ``.metadata`` file is one pickle, checked with DCP's metadata classes allowed;
- a safetensors header is checked (size cap, JSON without duplicate keys, known dtypes, offsets
  in range, not overlapping, matching the shapes) before any weight is read.

Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from aptbundle.format.pickles import MAX_PICKLE_BYTES, MalformedPickle, scan_pickle
from aptbundle.format.stream import Stream, file_source
from aptbundle.format.trust import extra_globals
from aptbundle.ground.errors import UnsafeContentError
from aptbundle.ground.problems import Kind, Problem
from aptbundle.ground.values import DuplicateKey, unique_keys

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
MAX_ZIP_ENTRIES = 1_000_000
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt", ".pickle")
LEGACY_PICKLES = 5  # magic number, protocol, system info, the object, the storage keys

_LOCAL, _CENTRAL, _DESC = b"PK\x03\x04", b"PK\x01\x02", b"PK\x07\x08"
_EOCD, _EOCD64, _LOC64 = b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"


def is_dcp_metadata(rel: str) -> bool:
    """True for a torch.distributed.checkpoint ``.metadata`` file, at any depth."""
    return rel.rsplit("/", 1)[-1] == ".metadata"


def needs_scan(rel: str) -> bool:
    """True for files whose loading could run code or read out of bounds."""
    return (rel.endswith(PICKLE_SUFFIXES) or rel.endswith((".safetensors", ".distcp"))
            or is_dcp_metadata(rel))


def scan_stream(stream: Stream, rel: str, paths: list[str] | None = None) -> list[str]:
    """Check the file ``rel`` read from ``stream`` (positioned at its start), by its trust policy.

    Returns the pickle globals it names (empty for safetensors); raises ``UnsafeContentError``.
    Strings that look like absolute machine paths are appended to ``paths``. The stream is left
    wherever the check stopped: call ``drain`` after it.
    """
    if rel.endswith(".safetensors"):
        check_safetensors(stream, rel)
        return []
    extra = extra_globals(rel)
    head = stream.peek(4)
    if is_dcp_metadata(rel):
        return scan_pickle(stream, rel, dcp=True, paths=paths)
    if rel.endswith(".distcp"):  # DCP's data: one torch.save zip per item, back to back
        names: list[str] = []
        while stream.peek(1):
            if not stream.peek(4).startswith(_LOCAL):
                raise UnsafeContentError(f"{rel}: item at byte {stream.tell()} is not a torch.save zip;"
                                         " the file is damaged or crafted")
            names += _scan_zip(stream, rel, last=False, paths=paths)
        return names
    if head.startswith(b"PK"):
        return _scan_zip(stream, rel, allowed=extra, paths=paths)
    # not a zip: torch.load and pickle.load read it as pickles in a row (a legacy torch.save file is
    # five), and so does the scan, with the same unpickler; bytes it cannot load as one are refused
    # as unchecked, whatever the name says they are, since a loader would try them all the same
    names: list[str] = []
    for i in range(LEGACY_PICKLES):
        if not stream.peek(1):
            break
        try:
            names += scan_pickle(stream, rel, extra=extra, paths=paths)
        except MalformedPickle as e:
            raise UnsafeContentError(f"{rel}: cannot be checked: its name says it holds a pickle or a torch file,"
                                     f" and pickle {i + 1} is not one CPython can load"
                                     f" ({str(e).removeprefix(rel + ': ')}). Do not load it; if it is plain"
                                     " data, give it a name that says so") from None
    return names


def scan_file(path: Path, rel: str) -> list[str]:
    """``scan_stream`` on a file on disk."""
    with open(path, "rb", buffering=0) as f:
        return scan_stream(Stream(file_source(f), os.fstat(f.fileno()).st_size), rel)


def unsafe(rel: str, error: Exception) -> Problem:
    """The problem that reports a refused file."""
    return Problem(rel, Kind.UNSAFE, "only tensors and plain data", str(error))


# -- zip (torch.save) ----------------------------------------------------------------------
def _need(stream: Stream, n: int, shown: str, what: str) -> bytes:
    b = stream.read(n)
    if len(b) != n:
        raise UnsafeContentError(f"{shown}: zip {what} is cut short; the file is damaged")
    return b


def _zip64_sizes(extra: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while pos + 4 <= len(extra):
        hid, n = struct.unpack_from("<HH", extra, pos)
        out[hid] = extra[pos + 4:pos + 4 + n]
        pos += 4 + n
    return out


def _find_descriptor(stream: Stream, start: int, zip64: bool, shown: str, name: str,
                     expect: int | None = None) -> int:
    """Skip a stored entry of unknown size up to its data descriptor; return the data's size.

    The descriptor is found by its signature followed by two copies of the size read so far; a
    forged one inside the data only makes the walk disagree with the central directory, which
    is then refused. ``expect``, the size the pickle declared for this storage, is tried first:
    then the data is skipped, not searched.
    """
    fmt = "<QQ" if zip64 else "<II"
    dlen = 8 + struct.calcsize(fmt)
    done = stream.tell() - start
    if expect is not None and expect >= done:
        stream.skip(expect - done)
        if stream.buffered(dlen) >= dlen and stream.find(_DESC, 0, 4) == 0 \
                and stream.unpack_from(fmt, 8) == (expect, expect):
            return expect
    while True:
        avail = stream.buffered(dlen)
        if avail < dlen:
            raise UnsafeContentError(f"{shown}: zip entry {name!r} has no data descriptor; the file is damaged")
        i = stream.find(_DESC, 0, avail - dlen + 4)
        while i >= 0:
            sizes = stream.unpack_from(fmt, i + 8)
            if sizes[0] == sizes[1] == stream.tell() + i - start:
                stream.skip(i)
                return sizes[0]
            i = stream.find(_DESC, i + 1, avail - dlen + 4)
        stream.skip(avail - dlen + 1)


def _scan_zip(stream: Stream, shown: str, last: bool = True, allowed: frozenset[str] = frozenset(),
              paths: list[str] | None = None) -> list[str]:
    """Walk one zip from the stream's position; ``last``: nothing may follow it."""
    base = stream.tell()  # offsets in a zip count from its own start
    names: list[str] = []
    storages: dict[str, int] = {}  # storage key -> bytes, as data.pkl declares them
    local: dict[int, tuple[str, int, int]] = {}  # offset -> (name, method, data size)
    while True:
        at = stream.tell()
        sig = _need(stream, 4, shown, "record")
        if sig != _LOCAL:
            break
        if len(local) >= MAX_ZIP_ENTRIES:
            raise UnsafeContentError(f"{shown}: more than {MAX_ZIP_ENTRIES} zip entries; refusing it")
        _ver, flags, method, _t, _d, _crc, csize, _usize, nlen, elen = struct.unpack(
            "<HHHHHIIIHH", _need(stream, 26, shown, "local header"))
        raw_name = _need(stream, nlen, shown, "entry name")
        extra = _need(stream, elen, shown, "extra field")
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        if flags & 0x1:
            raise UnsafeContentError(f"{shown}: zip entry {name!r} is encrypted; a torch.save file never is")
        if method != 0:
            raise UnsafeContentError(f"{shown}: zip entry {name!r} uses compression method {method};"
                                     " torch.save stores entries uncompressed (method 0)")
        z64 = _zip64_sizes(extra).get(1)
        start = stream.tell()
        if name.endswith("/constants.pkl") or "/code/" in name:
            raise UnsafeContentError(f"{shown}: a TorchScript archive ({name!r}); torch.load hands it to torch.jit.load,"
                                     " which runs its code. Do not load it; expected a torch.save file")
        if name.endswith(".pkl"):
            names += scan_pickle(stream, f"{shown}:{name}", storages=storages, extra=allowed, paths=paths)
        if flags & 0x8:
            key = name.rsplit("/data/", 1)[1] if "/data/" in name else None
            size = _find_descriptor(stream, start, z64 is not None, shown, name, storages.get(key))
            _need(stream, 24 if z64 is not None else 16, shown, "data descriptor")
        else:
            if csize == 0xFFFFFFFF and z64 is not None and len(z64) >= 16:
                csize = struct.unpack_from("<Q", z64, 8)[0]
            size = csize
            done = stream.tell() - start
            if done > size or stream.skip(size - done) != size - done:
                raise UnsafeContentError(f"{shown}: zip entry {name!r} is cut short; the file is damaged")
        if name.endswith(".pkl") and size > MAX_PICKLE_BYTES:
            raise UnsafeContentError(f"{shown}: {name} is {size} bytes, over the limit for a pickle")
        local[at - base] = (name, method, size)
    _check_central(stream, sig, at - base, local, shown, base, last)
    return names


def _check_central(stream: Stream, sig: bytes, at: int, local: dict, shown: str, base: int = 0,
                   last: bool = True) -> None:
    """The central directory must list exactly the entries walked, at their offsets, and the
    zip must end with its end record (no comment that could hide a second one): the file ends
    there too, unless ``last`` is false (DCP's items follow each other)."""
    if not local:
        raise UnsafeContentError(f"{shown}: zip file without entries; expected a torch.save file")
    cd_start, seen = at, set()
    while sig == _CENTRAL:
        (_vm, _vn, flags, method, _t, _d, _crc, csize, _usize, nlen, elen, clen, _disk, _ia, _ea,
         off) = struct.unpack("<HHHHHHIIIHHHHHII", _need(stream, 42, shown, "central directory"))
        name = _need(stream, nlen, shown, "central directory").decode("utf-8" if flags & 0x800 else "cp437", "replace")
        z64 = _zip64_sizes(_need(stream, elen, shown, "central directory")).get(1, b"")
        _need(stream, clen, shown, "central directory")
        fields = iter(struct.unpack(f"<{len(z64) // 8}Q", z64[:len(z64) // 8 * 8]))
        if _usize == 0xFFFFFFFF:
            next(fields, None)
        if csize == 0xFFFFFFFF:
            csize = next(fields, csize)
        if off == 0xFFFFFFFF:
            off = next(fields, off)
        walked = local.get(off)
        if walked is None or walked[0] != name or walked[1] != method or walked[2] != csize or off in seen:
            raise UnsafeContentError(f"{shown}: the zip directory's entry {name!r} does not match the entry"
                                     " stored at its offset; the file is crafted or damaged. Do not load it")
        seen.add(off)
        sig = _need(stream, 4, shown, "end record")
    if len(seen) != len(local):
        raise UnsafeContentError(f"{shown}: zip entries missing from its directory; the file is damaged")
    cd_end = stream.tell() - 4 - base
    if sig == _EOCD64:
        (n,) = struct.unpack("<Q", _need(stream, 8, shown, "end record"))
        rec = _need(stream, n, shown, "end record") if n <= 1 << 16 else b""
        if len(rec) < 44 or struct.unpack_from("<QQ", rec, 28) != (cd_end - cd_start, cd_start):
            raise UnsafeContentError(f"{shown}: zip64 end record does not match its directory; damaged or crafted")
        eocd64_at = cd_end
        if _need(stream, 4, shown, "end record") != _LOC64:
            raise UnsafeContentError(f"{shown}: zip64 locator missing; the file is damaged")
        if struct.unpack("<IQI", _need(stream, 16, shown, "end record"))[1] != eocd64_at:
            raise UnsafeContentError(f"{shown}: zip64 locator points elsewhere; damaged or crafted")
        sig = _need(stream, 4, shown, "end record")
    if sig != _EOCD:
        raise UnsafeContentError(f"{shown}: unexpected zip record {sig!r} at byte {stream.tell() - 4}; the file is damaged")
    (_d1, _d2, _n1, n2, cd_size, cd_off, clen) = struct.unpack("<HHHHIIH", _need(stream, 18, shown, "end record"))
    if n2 not in (len(seen), 0xFFFF) or cd_off not in (cd_start, 0xFFFFFFFF) or cd_size not in (cd_end - cd_start, 0xFFFFFFFF):
        raise UnsafeContentError(f"{shown}: zip end record does not match its directory; damaged or crafted")
    comment = _need(stream, clen, shown, "comment")
    if any(s in comment for s in (_EOCD, _EOCD64, _LOC64)) or (last and stream.read(1)):
        raise UnsafeContentError(f"{shown}: data after the zip's end record; damaged or crafted. Do not load it")


# -- safetensors ---------------------------------------------------------------------------
_ST_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2,
             "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
             "F64": 8, "C64": 8, "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75}


def check_safetensors(stream: Stream, shown: str) -> dict:
    """Validate a safetensors header against the file's size; return the parsed header."""
    size = stream.size
    raw = stream.read(8)
    if len(raw) < 8:
        raise UnsafeContentError(f"{shown}: {size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_SAFETENSORS_HEADER or n > size - 8:
        raise UnsafeContentError(
            f"{shown}: header claims {n} bytes; expected at most {min(MAX_SAFETENSORS_HEADER, size - 8)}")
    text = stream.read(n)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=unique_keys)
    except DuplicateKey as e:
        raise UnsafeContentError(f"{shown}: safetensors header has a {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UnsafeContentError(f"{shown}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise UnsafeContentError(f"{shown}: safetensors header is not a JSON object")
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise UnsafeContentError(f"{shown}: __metadata__ must map strings to strings")
            continue
        where = f"{shown}: tensor {key!r}"
        if not isinstance(info, dict):
            raise UnsafeContentError(f"{where}: expected an object with dtype, shape, data_offsets")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ST_SIZES:
            raise UnsafeContentError(f"{where}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise UnsafeContentError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise UnsafeContentError(f"{where}: data_offsets {offs!r} is not [begin, end]")
        b, e = offs
        if not 0 <= b <= e <= data_len:
            raise UnsafeContentError(f"{where}: data_offsets [{b}, {e}] outside the {data_len}-byte data section")
        count = 1
        for d in shape:
            count *= d
        if e - b != count * _ST_SIZES[dtype]:
            raise UnsafeContentError(f"{where}: holds {e - b} bytes; shape {shape} of {dtype} needs {count * _ST_SIZES[dtype]}")
        spans.append((b, e, key))
    spans.sort()
    for (b1, e1, k1), (b2, e2, k2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise UnsafeContentError(f"{shown}: tensors {k1!r} and {k2!r} overlap in the data section")
        if b2 > e1:
            raise UnsafeContentError(f"{shown}: {b2 - e1} bytes between tensors {k1!r} and {k2!r} belong to"
                                     " none; safetensors packs its data without gaps")
    end = spans[-1][1] if spans else 0
    if (spans and spans[0][0] != 0) or end != data_len:
        raise UnsafeContentError(f"{shown}: the tensors cover bytes {spans[0][0] if spans else 0} to {end} of a"
                                 f" {data_len}-byte data section; expected all of it, without gaps")
    return header

"""Build archives byte by byte, good and hostile, for the unpack tests."""

from __future__ import annotations

import hashlib
import json

import zstandard

from aptbundle.archive.tarstream import end_of_archive, padding, pax_record, tar_header

SHA0 = hashlib.sha256(b"").hexdigest()


def manifest(name: str, files: dict[str, bytes], **over) -> bytes:
    d = {"format": "aptrun", "format_version": 1, "name": name, "run_id": "r", "trainer": None,
         "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
         "files": sorted(({"path": p, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                          for p, b in files.items()), key=lambda f: f["path"]),
         "checkpoints": [], "latest": None, "best": None, "environment": {}, "history": []}
    d.update(over)
    return json.dumps(d).encode()


def member(name: str, data: bytes = b"", typeflag: bytes = b"0", *, size: int | None = None,
           pax: dict | None = None, mode: int = 0o644, linkname: bytes = b"") -> bytes:
    """One tar member; ``size`` overrides the header's size field (data is written as given)."""
    raw_name = name.encode("utf-8", "surrogateescape")
    out = b""
    if pax:
        body = b"".join(pax_record(k, v) for k, v in pax.items())
        out += tar_header(b"PaxHeader/x", len(body), b"x", 0o644, 0) + body + padding(len(body))
    h = bytearray(tar_header(raw_name[:100], len(data) if size is None else size, typeflag, mode, 0))
    if linkname:
        h[157:157 + len(linkname)] = linkname
        h[148:156] = b" " * 8
        h[148:156] = b"%06o\0 " % sum(h)
    return out + bytes(h) + data + padding(len(data))


def tar(*members: bytes, end: bool = True) -> bytes:
    body = b"".join(members)
    return body + (end_of_archive(len(body)) if end else b"")


def zst(data: bytes, level: int = 3) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)


def good_parts(name: str = "run1", files: dict[str, bytes] | None = None) -> tuple[dict[str, bytes], list[bytes]]:
    files = files if files is not None else {"config.json": b"{}", "data/a.txt": b"hello" * 100}
    ms = [member(f"{name}/aptrun.json", manifest(name, files))]
    ms += [member(f"{name}/{p}", b) for p, b in sorted(files.items())]
    return files, ms


def good_archive(name: str = "run1", files: dict[str, bytes] | None = None) -> bytes:
    return zst(tar(*good_parts(name, files)[1]))


def torch_zip(payload: bytes) -> bytes:
    """A zip shaped like a ``torch.save`` file whose ``data.pkl`` is ``payload`` (no tensors)."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()

"""A strict, streaming POSIX tar writer and reader.

``tarfile`` reads whole pax headers into memory and accepts links, devices and sparse files;
an archive that may come from anyone needs less. The writer emits deterministic ustar headers
(pax records only for long or non-ASCII names and sizes of 8 GiB or more) that GNU tar and
bsdtar read. The reader accepts only regular files, directories and small pax / GNU long-name
headers, checks every header checksum and number, and refuses everything else by name. (The
zstd frame around the tar is ``transfer.frames``'s.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aptbundle.ground.errors import ArchiveError

TAR_BLOCK = 512
RECORD = 20 * TAR_BLOCK  # what GNU tar pads the end of an archive to
MAX_PAX = 64 * 1024
MAX_EXTENDED = 1 << 20  # extended-header bytes before one member: chained pax headers add up
_OCTAL_MAX_SIZE = 0o77777777777


def _octal(value: int, width: int) -> bytes:
    return (b"%0*o" % (width - 1, value)) + b"\0"


def _pad(n: int) -> int:
    return -n % TAR_BLOCK


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode("utf-8")
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def tar_header(name: bytes, size: int, typeflag: bytes, mode: int, mtime: int) -> bytes:
    h = bytearray(TAR_BLOCK)
    h[0:len(name)] = name
    h[100:108] = _octal(mode, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(mtime, 12)
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[257:265] = b"ustar\x0000"
    h[329:337] = _octal(0, 8)
    h[337:345] = _octal(0, 8)
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def member_header(name: str, size: int, *, is_dir: bool = False, mtime: int = 0,
                  extra_pax: dict[str, str] | None = None, mode: int | None = None) -> bytes:
    """Header block(s) for one member: mode 0644/0755 (or ``mode``'s permission bits: a private
    0600 file stays private), owner 0:0, no user names, fixed mtime.

    ``extra_pax`` adds records (aptbundle's own ``APTBUNDLE.*`` keys) to the member's pax header.
    """
    raw = name.encode("utf-8")
    pax = b"".join(pax_record(k, v) for k, v in sorted((extra_pax or {}).items()))
    short = raw
    if len(raw) > 100 or not raw.isascii():
        pax += pax_record("path", name)
        short = raw.decode("ascii", "replace").encode("ascii", "replace")[-100:] if raw.isascii() else \
            ("aptrun-member-" + str(len(raw))).encode()
    if size > _OCTAL_MAX_SIZE:
        pax += pax_record("size", str(size))
    out = b""
    if pax:
        out += tar_header(b"PaxHeader/" + short[-90:], len(pax), b"x", 0o644, mtime) + pax + b"\0" * _pad(len(pax))
    hsize = 0 if is_dir or size > _OCTAL_MAX_SIZE else size  # a larger size travels in the pax record
    mode = (0o755 if is_dir else 0o644) if mode is None else mode & 0o777
    return out + tar_header(short, hsize, b"5" if is_dir else b"0", mode, mtime)


def padding(size: int) -> bytes:
    """Zero bytes that complete a member's data to a 512-byte block."""
    return b"\0" * _pad(size)


def end_of_archive(written: int) -> bytes:
    """Two zero blocks, then zeros up to a full 10 KiB record, as GNU tar writes."""
    n = written + 2 * TAR_BLOCK
    return b"\0" * (2 * TAR_BLOCK + (-n % RECORD))


# -- reading ---------------------------------------------------------------------------------
@dataclass
class TarEntry:
    """One member as the reader found it."""

    name: str
    kind: str  # "file" or "dir"
    size: int
    pax: dict = field(default_factory=dict)  # the member's pax records
    mode: int = 0o644  # permission bits as recorded (setuid, setgid and sticky never kept)


def _parse_number(field: bytes, what: str, where: str) -> int:
    if field[:1] in (b"\x80", b"\xff"):
        if field[:1] == b"\xff":
            raise ArchiveError(f"{where}: negative {what} in tar header; the archive is malformed")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not all(48 <= c <= 55 for c in text):
        raise ArchiveError(f"{where}: tar header field {what} is {field!r}; expected octal digits")
    return int(text, 8)


class TarReader:
    """Pull members one by one from a byte stream that returns exactly what is asked of it."""

    def __init__(self, read_exact, read_some=None, label: str = "archive"):
        self.label = label
        self._read = read_exact  # read_exact(n) -> bytes of length n or raises ArchiveError
        self._some = read_some or read_exact  # read_some(n) -> 1..n bytes
        self.offset = 0
        self._pending = 0  # data + padding of the current member
        self._size = 0  # data bytes of the current member
        self._left = 0  # data bytes of the current member not yet read

    def _block(self) -> bytes:
        b = self._read(TAR_BLOCK)
        self.offset += TAR_BLOCK
        return b

    def next(self) -> TarEntry | None:
        """The next member's header, or None at the end-of-archive marker."""
        if self._pending:
            self.end_member()
        pax: dict[str, str] = {}
        longname: str | None = None
        extended = 0
        while True:
            where = f"{self.label}: tar header at byte {self.offset}"
            h = self._block()
            if h == b"\0" * TAR_BLOCK:
                if self._block() != b"\0" * TAR_BLOCK:
                    raise ArchiveError(f"{where}: a lone zero block inside the archive; the tar stream is malformed")
                if pax or longname is not None:
                    raise ArchiveError(f"{where}: extended header with no member after it")
                return None
            stored = _parse_number(h[148:156], "checksum", where)
            calc = sum(h[:148]) + 256 + sum(h[156:])
            if stored != calc:
                raise ArchiveError(f"{where}: header checksum {stored} does not match {calc}; the archive is corrupt")
            if h[257:263] not in (b"ustar\x00", b"ustar "):
                raise ArchiveError(f"{where}: not a ustar header (magic {h[257:263]!r}); expected a POSIX tar")
            typeflag = h[156:157]
            size = _parse_number(h[124:136], "size", where)
            if typeflag in (b"x", b"L"):
                extended += size
                if size > MAX_PAX or extended > MAX_EXTENDED:
                    raise ArchiveError(f"{where}: extended headers of {max(size, extended)} bytes; at most"
                                       f" {MAX_PAX} per header and {MAX_EXTENDED} per member are accepted")
                data = self._read(size + _pad(size))[:size]
                self.offset += size + _pad(size)
                if typeflag == b"L":
                    longname = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                else:
                    pax.update(_parse_pax(data, where))
                continue
            kinds = {b"0": "file", b"\0": "file", b"5": "dir"}
            if typeflag not in kinds:
                names = {b"1": "hard link", b"2": "symbolic link", b"3": "character device",
                         b"4": "block device", b"6": "FIFO", b"7": "contiguous file", b"S": "sparse file",
                         b"g": "global pax header", b"K": "GNU long link name", b"V": "volume label"}
                what = names.get(typeflag, f"type {typeflag!r}")
                raw_name = h[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                raise ArchiveError(f"{self.label}: member {raw_name!r} is a {what}; archives may hold only"
                                   " regular files and folders")
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise ArchiveError(f"{where}: pax size {pax['size']!r} is not a number") from None
            if size < 0:
                raise ArchiveError(f"{where}: negative member size")
            name = pax.get("path") or longname
            if name is None:
                name = h[:100].split(b"\0", 1)[0]
                prefix = h[345:500].split(b"\0", 1)[0] if h[257:263] == b"ustar\x00" else b""
                if prefix:
                    name = prefix + b"/" + name
                try:
                    name = name.decode("utf-8")
                except UnicodeDecodeError:
                    raise ArchiveError(f"{where}: member name {name!r} is not UTF-8") from None
            kind = kinds[typeflag]
            if kind == "dir":
                if size:
                    raise ArchiveError(f"{self.label}: member {name!r} is a folder with {size} bytes of data")
                name = name[:-1] if name.endswith("/") else name
            self._pending, self._size, self._left = size + _pad(size), size, size
            mode = _parse_number(h[100:108], "mode", where) & 0o777
            return TarEntry(name, kind, size, pax, mode)

    def read_data(self, n: int) -> bytes:
        """Up to ``n`` bytes of the current member's data; b"" once all of it was read."""
        if not self._left:
            return b""
        b = self._some(min(n, self._left))
        self._left -= len(b)
        return b

    def end_member(self, chunk: int = 1 << 20) -> None:
        """Skip what is left of the current member's data and its padding."""
        while self.read_data(chunk):
            pass
        pad = self._pending - self._size
        if pad:
            self._read(pad)
        self.offset += self._pending
        self._pending = self._size = 0


def _parse_pax(data: bytes, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0 or sp - pos > 20:
            raise ArchiveError(f"{where}: malformed pax record; the archive is corrupt")
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise ArchiveError(f"{where}: malformed pax record length {data[pos:sp]!r}") from None
        rec = data[pos:pos + length]
        if length < sp - pos + 3 or len(rec) != length or not rec.endswith(b"\n") or b"=" not in rec:
            raise ArchiveError(f"{where}: malformed pax record; the archive is corrupt")
        key, _, value = rec[sp - pos + 1:-1].partition(b"=")
        try:
            k, v = key.decode("utf-8"), value.decode("utf-8")
        except UnicodeDecodeError:
            raise ArchiveError(f"{where}: pax record is not UTF-8") from None
        if k.startswith("GNU.sparse") or (k == "linkpath" and v):
            raise ArchiveError(f"{where}: pax record {k!r}: sparse files and links are not accepted")
        out[k] = v
        pos += length
    return out

"""Archives from strangers: every unsafe or broken archive is refused cleanly, leaving nothing.

Each case is refused by ``unpack`` (exit 1, one clear reason, no traceback, nothing in DEST and
nothing outside it) and by ``verify``.
"""

from __future__ import annotations

import os
import stat

import pytest
import zstandard

from aptbundle.format.manifest import MAX_MANIFEST_BYTES
from archive_builder import good_archive, good_parts, manifest, member, tar, zst
from conftest import cli, no_traceback

N = "run1"
FILES = {"config.json": b"{}", "data/a.txt": b"hello" * 100}


def with_members(*extra: bytes, files=FILES, name=N) -> bytes:
    _, ms = good_parts(name, files)
    return zst(tar(*ms, *extra))


def listed_with(extra_files: dict[str, bytes], members: list[bytes], name=N) -> bytes:
    files = {**FILES, **extra_files}
    return zst(tar(member(f"{name}/aptrun.json", manifest(name, files)), *members))


def good_members():
    return good_parts(N, FILES)[1]


def bomb() -> bytes:
    # the manifest says 10 bytes; the member says 10 bytes but the stream carries 200 MB of zeros
    files = {"big.dat": b"\0" * 10}
    man = member(f"{N}/aptrun.json", manifest(N, files))
    cobj = zstandard.ZstdCompressor(level=1).compressobj()
    out = cobj.compress(tar(man, member(f"{N}/big.dat", b"\0" * 10), end=False))
    chunk = b"\0" * (1 << 20)
    for _ in range(200):
        out += cobj.compress(chunk)
    return out + cobj.flush()


def corrupt_middle() -> bytes:
    data = bytearray(good_archive(files={"x.dat": os.urandom(200_000)}))
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    return bytes(data)


def bad_checksum() -> bytes:
    ms = good_members()
    hdr = bytearray(ms[1][:512])
    hdr[0] ^= 1  # name changed, checksum not
    return zst(tar(ms[0], bytes(hdr) + ms[1][512:], ms[2]))


CASES = {
    "absolute": lambda: with_members(member("/x", b"1")),
    "absolute-in-run": lambda: with_members(member(f"/{N}/x", b"1")),
    "drive-letter": lambda: with_members(member("C:/x", b"1")),
    "unc": lambda: with_members(member("\\\\server\\x", b"1")),
    "dotdot": lambda: with_members(member(f"{N}/../escape.txt", b"1")),
    "dotdot-deep": lambda: with_members(member(f"{N}/data/../../escape.txt", b"1")),
    "backslash": lambda: with_members(member(f"{N}\\..\\x", b"1")),
    "symlink": lambda: with_members(member(f"{N}/link", typeflag=b"2", linkname=b"/etc/passwd")),
    "symlink-chain": lambda: with_members(member(f"{N}/l1", typeflag=b"2", linkname=b"l2"),
                                          member(f"{N}/l2", typeflag=b"2", linkname=b"../../x")),
    "symlink-listed": lambda: listed_with({"l": b""}, good_members()[1:] + [member(f"{N}/l", typeflag=b"2", linkname=b"config.json")]),
    "hardlink": lambda: with_members(member(f"{N}/hl", typeflag=b"1", linkname=f"{N}/config.json".encode())),
    "hardlink-outside": lambda: with_members(member(f"{N}/hl", typeflag=b"1", linkname=b"/etc/shadow")),
    "char-device": lambda: with_members(member(f"{N}/dev", typeflag=b"3")),
    "block-device": lambda: with_members(member(f"{N}/blk", typeflag=b"4")),
    "fifo": lambda: with_members(member(f"{N}/fifo", typeflag=b"6")),
    "gnu-sparse": lambda: with_members(member(f"{N}/sparse", b"1", typeflag=b"S")),
    "pax-sparse": lambda: with_members(member(f"{N}/sparse", b"1", pax={"GNU.sparse.major": "1"})),
    "global-pax": lambda: with_members(member("pax_global_header", b"10 path=x\n", typeflag=b"g")),
    "duplicate": lambda: with_members(member(f"{N}/config.json", b"{}")),
    "duplicate-manifest": lambda: with_members(member(f"{N}/aptrun.json", manifest(N, FILES))),
    "nfc-duplicate": lambda: listed_with({"\u00e9.txt": b"1"}, good_members()[1:] + [
        member(f"{N}/\u00e9.txt", b"1", pax={"path": f"{N}/\u00e9.txt"}),
        member(f"{N}/e\u0301.txt", b"1", pax={"path": f"{N}/e\u0301.txt"})]),
    "case-collision": lambda: listed_with({"Model.dat": b"1"}, good_members()[1:] + [
        member(f"{N}/Model.dat", b"1"), member(f"{N}/model.dat", b"1")]),
    "reserved-name": lambda: with_members(member(f"{N}/CON", b"1")),
    "reserved-name-ext": lambda: with_members(member(f"{N}/data/nul.txt", b"1")),
    "control-char": lambda: with_members(member(f"{N}/a\x07b", b"1")),
    "trailing-dot": lambda: with_members(member(f"{N}/a.", b"1")),
    "outside-run-folder": lambda: with_members(member("other/x", b"1")),
    "unlisted-member": lambda: with_members(member(f"{N}/surprise.txt", b"1")),
    "listed-missing": lambda: zst(tar(*good_members()[:2])),
    "size-mismatch": lambda: zst(tar(good_members()[0], member(f"{N}/config.json", b"{}  "), good_members()[2])),
    "hash-mismatch": lambda: zst(tar(good_members()[0], member(f"{N}/config.json", b"[]"), good_members()[2])),
    "dir-where-file": lambda: zst(tar(good_members()[0], member(f"{N}/config.json", typeflag=b"5"), good_members()[2])),
    "dir-unlisted": lambda: with_members(member(f"{N}/newdir/", typeflag=b"5")),
    "dir-with-data": lambda: with_members(member(f"{N}/data/", b"x" * 10, typeflag=b"5")),
    "bomb": bomb,
    "size-lie-larger": lambda: zst(tar(good_members()[0], member(f"{N}/config.json", b"{}" * 5000), good_members()[2])),
    "header-size-overrun": lambda: zst(tar(good_members()[0], member(f"{N}/config.json", b"{}", size=1 << 33))),
    "truncated-zstd": lambda: good_archive()[:-20],
    "truncated-tar": lambda: zst(tar(*good_members(), end=False)[:-300]),
    "no-end-marker": lambda: zst(tar(*good_members(), end=False)),
    "corrupt-zstd": corrupt_middle,
    "trailing-bytes": lambda: good_archive() + b"garbage",
    "trailing-zeros": lambda: good_archive() + b"\0" * 8,
    "extra-frame": lambda: good_archive() + zst(b"\0" * 1024),
    "skippable-frame": lambda: good_archive() + b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd",
    "data-after-tar-end": lambda: zst(tar(*good_members()) + member(f"{N}/late.txt", b"1")),
    "bad-header-checksum": bad_checksum,
    "bad-magic": lambda: zst(b"\x01" * 1024),
    "not-zstd": lambda: tar(*good_members()),
    "empty-file": lambda: b"",
    "empty-tar": lambda: zst(tar()),
    "malformed-pax": lambda: with_members(_malformed_pax()),
    "pax-huge": lambda: with_members(member(f"{N}/PaxHeader", b"", typeflag=b"x", size=10 << 30)),
    "pax-bad-size": lambda: with_members(member(f"{N}/x", b"1", pax={"size": "lots"})),
    "missing-manifest": lambda: zst(tar(*good_members()[1:])),
    "late-manifest": lambda: zst(tar(*good_members()[1:], good_members()[0])),
    "manifest-in-subfolder": lambda: zst(tar(member(f"{N}/data/aptrun.json", manifest(N, FILES)), *good_members()[1:])),
    "oversized-manifest": lambda: zst(tar(member(f"{N}/aptrun.json", b" " * 10, size=MAX_MANIFEST_BYTES + 1))),
    "unknown-version": lambda: zst(tar(member(f"{N}/aptrun.json", manifest(N, FILES, format_version=99)), *good_members()[1:])),
    "unknown-format": lambda: zst(tar(member(f"{N}/aptrun.json", manifest(N, FILES, format="zip")), *good_members()[1:])),
    "invalid-json": lambda: zst(tar(member(f"{N}/aptrun.json", b"{nope"), *good_members()[1:])),
    "manifest-unsafe-path": lambda: zst(tar(member(f"{N}/aptrun.json", manifest(N, {"../evil": b"1"})),
                                           member(f"{N}/../evil", b"1"))),
    "manifest-abs-path": lambda: zst(tar(member(f"{N}/aptrun.json", manifest(N, {"/etc/cron.d/x": b"1"})))),
    "manifest-name-mismatch": lambda: zst(tar(member(f"{N}/aptrun.json", manifest("other", FILES)), *good_members()[1:])),
    "run-name-dotdot": lambda: zst(tar(member("../aptrun.json", manifest("..", FILES)))),
    "many-files-manifest": lambda: zst(tar(member(f"{N}/aptrun.json", b"{}", size=10_000_000 * 100))),
}


def _malformed_pax() -> bytes:
    from aptbundle.archive.tarstream import padding, tar_header

    body = b"99 path=x\n"
    return tar_header(b"PaxHeader/x", len(body), b"x", 0o644, 0) + body + padding(len(body)) + member(f"{N}/x", b"1")


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_archive_is_refused_cleanly(case, tmp_path):
    data = CASES[case]()
    arc = tmp_path / "in" / "evil.aptrun.tar.zst"
    arc.parent.mkdir()
    arc.write_bytes(data)
    dest = tmp_path / "dest"
    dest.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    r = cli("unpack", arc, "-C", dest)
    assert r.exit_code == 1, (case, r.output)
    assert no_traceback(r.output)
    assert r.stderr.startswith("error: ")
    assert os.listdir(dest) == [], f"{case} left {os.listdir(dest)}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "evil").exists()
    r = cli("verify", arc)
    assert r.exit_code == 1 and no_traceback(r.output), (case, r.output)


def test_the_good_archive_of_the_suite_unpacks(tmp_path):
    arc = tmp_path / "good.aptrun.tar.zst"
    arc.write_bytes(good_archive())
    r = cli("unpack", arc, "-C", tmp_path / "d")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "d" / N / "data" / "a.txt").read_bytes() == FILES["data/a.txt"]


def test_modes_from_the_archive_are_never_applied(tmp_path):
    _, ms = good_parts(N, FILES)
    ms[1] = member(f"{N}/config.json", b"{}", mode=0o4777)  # setuid, world-writable, executable
    arc = tmp_path / "m.aptrun.tar.zst"
    arc.write_bytes(zst(tar(*ms)))
    assert cli("unpack", arc, "-C", tmp_path / "d").exit_code == 0
    mode = stat.S_IMODE((tmp_path / "d" / N / "config.json").stat().st_mode)
    assert mode == 0o755  # kept, but never setuid and never writable by others


def test_suite_size():
    assert len(CASES) >= 60


# -- random damage: whatever the bytes, the outcome is a clean refusal or the exact original ------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from aptbundle.archive import unpack  # noqa: E402
from aptbundle.ground.errors import AptBundleError  # noqa: E402

MUT_FILES = {"config.json": b'{"lr": 0.001}', "checkpoints/step-00000001/model.dat": bytes(range(256)) * 40,
             "logs/metrics.jsonl": b'{"step": 1}\n' * 50}
GOOD = good_archive(files=MUT_FILES)


def _try_unpack(data: bytes, tmp_path) -> None:
    import tempfile
    from pathlib import Path

    base = Path(tempfile.mkdtemp(dir=tmp_path))
    arc = base / "m.aptrun.tar.zst"
    arc.write_bytes(data)
    dest = base / "dest"
    try:
        out = unpack(arc, dest)
    except AptBundleError as e:
        assert str(e)
        assert os.listdir(dest) == [] if dest.exists() else True
        return
    for rel, content in MUT_FILES.items():  # accepted: then it is exactly the original
        assert (out / rel).read_bytes() == content
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        ["aptrun.json", *MUT_FILES])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_random_byte_mutations_are_refused_or_harmless(tmp_path, flips):
    data = bytearray(GOOD)
    for pos, x in flips:
        data[pos] ^= x
    _try_unpack(bytes(data), tmp_path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, len(GOOD) - 1), st.binary(max_size=64))
def test_random_truncation_and_insertion(tmp_path, cut, junk):
    _try_unpack(GOOD[:cut], tmp_path)
    _try_unpack(GOOD[:cut] + junk + GOOD[cut:], tmp_path)

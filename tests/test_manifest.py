"""The aptrun.json schema: what it accepts, what it refuses, and the run digest."""

import json

import pytest

from aptbundle.ground.errors import ManifestError
from aptbundle.format.manifest import MAX_MANIFEST_BYTES, FileEntry, Manifest, load_manifest, parse_manifest
from aptbundle.format.run import Run

SHA = "0" * 64


def base(**over):
    d = {"format": "aptrun", "format_version": 1, "name": "run1", "run_id": "x", "trainer": "apt_model",
         "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
         "files": [{"path": "config.json", "size": 2, "sha256": SHA}], "checkpoints": [], "latest": None,
         "best": None, "environment": {}, "history": []}
    d.update(over)
    return json.dumps(d).encode()


def test_round_trip_and_digest_is_canonical():
    m = parse_manifest(base())
    again = parse_manifest(m.to_bytes())
    assert again == m
    assert again.digest() == m.digest()
    # whitespace and key order do not change the digest
    reordered = json.dumps(dict(reversed(list(json.loads(base()).items()))), indent=4).encode()
    assert parse_manifest(reordered).digest() == m.digest()
    assert parse_manifest(base(name="run2")).digest() != m.digest()


@pytest.mark.parametrize("data,match", [
    (base(format="zip"), "format is 'zip'"),
    (base(format_version=2), "newer than this aptbundle"),
    (base(format_version="1"), "format_version"),
    (base(files=[{"path": "../x", "size": 1, "sha256": SHA}]), r"'\.\.'"),
    (base(files=[{"path": "/abs", "size": 1, "sha256": SHA}]), "absolute"),
    (base(files=[{"path": "a", "size": 1, "sha256": SHA}, {"path": "a", "size": 1, "sha256": SHA}]), "twice"),
    (base(files=[{"path": "A", "size": 1, "sha256": SHA}, {"path": "a", "size": 1, "sha256": SHA}]), "case-insensitive"),
    (base(files=[{"path": "a", "size": -1, "sha256": SHA}]), "negative"),
    (base(files=[{"path": "a", "size": 1, "sha256": "xyz"}]), "hex"),
    (base(files=[{"path": "aptrun.json", "size": 1, "sha256": SHA}]), "itself"),
    (base(latest="step-1"), "not among the checkpoints"),
    (base(name="a/b"), "one name"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{not json", "not valid JSON"),
    (b"[]", "JSON object"),
    (b'{"format": "aptrun", "format": "aptrun"}', "duplicate key"),
    (base().replace(b'"files"', b'"filez"'), "'files' is missing"),
])
def test_refusals(data, match):
    with pytest.raises(ManifestError, match=match):
        parse_manifest(data)


def test_size_cap_refuses_before_parsing():
    with pytest.raises(ManifestError, match="limit"):
        parse_manifest(b" " * (MAX_MANIFEST_BYTES + 1))


def test_unknown_keys_survive_round_trip():
    m = parse_manifest(base(custom={"a": 1}))
    assert json.loads(m.to_bytes())["custom"] == {"a": 1}


def test_save_is_atomic_and_loadable(tmp_path):
    run = Run.create(tmp_path / "r", trainer="t")
    run.write_file("config.json", b"{}")
    run.save_manifest()
    m = load_manifest(tmp_path / "r")
    assert m.files == [FileEntry("config.json", 2, m.files[0].sha256)]
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".aptrun-tmp")]


def test_missing_manifest_says_what_to_do(tmp_path):
    with pytest.raises(ManifestError, match="aptbundle init"):
        load_manifest(tmp_path)


def test_manifest_names_no_absolute_path(tmp_path):
    run = Run.create(tmp_path / "deep" / "r", trainer="t")
    assert str(tmp_path) not in (tmp_path / "deep" / "r" / "aptrun.json").read_text()
    assert isinstance(run.manifest, Manifest)

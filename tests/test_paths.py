"""The portable-path rules, by example and by property."""

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aptbundle.ground.errors import UnsafePathError
from aptbundle.ground.paths import check_collisions, check_name, normalize_relpath

GOOD = ["config.json", "checkpoints/step-00000010/model.safetensors", "data/中文.txt", "a b/c-d_e.f",
        "lpt10", "conx.txt", ".hidden"]
BAD = {
    "": "empty", "/etc/passwd": "absolute", "C:/x": "drive letter", "c:x": "drive letter",
    "\\\\server\\x": "backslash", "a\\b": "backslash", "a/../b": "'..'", "..": "'..'", "./a": "'.'",
    "a//b": "empty component", "a/": "empty component", "a\x00b": "control", "a\nb": "control",
    "a\x7fb": "control", "CON": "reserved", "con.txt": "reserved", "aux.tar.gz": "reserved",
    "NUL": "reserved", "com1": "reserved", "LPT9.log": "reserved", "dir/PRN": "reserved",
    "a.": "dot or a space", "a ": "dot or a space", "x/b./c": "dot or a space", "a:b/c": "drive",
    "a/b:c": "Windows cannot store", "a?": "Windows cannot store", "a*b": "Windows cannot store",
    "x" * 300: "longer than",
}


@pytest.mark.parametrize("path", GOOD)
def test_good_paths_pass_unchanged(path):
    assert normalize_relpath(path) == path


@pytest.mark.parametrize("path,rule", BAD.items())
def test_bad_paths_name_the_rule(path, rule):
    with pytest.raises(UnsafePathError, match=rule.replace("(", r"\(").replace("?", r"\?")):
        normalize_relpath(path)


def test_nfc_normalisation():
    decomposed = "e\u0301.txt"
    assert normalize_relpath(decomposed) == "\u00e9.txt"


def test_collisions():
    check_collisions(["a/b", "a/c", "b"])
    with pytest.raises(UnsafePathError, match="case-insensitive"):
        check_collisions(["Model.pt", "model.pt"])
    with pytest.raises(UnsafePathError, match="case-insensitive"):
        check_collisions(["\u00e9", "e\u0301"])
    with pytest.raises(UnsafePathError, match="twice"):
        check_collisions(["a", "a"])
    with pytest.raises(UnsafePathError, match="folder"):
        check_collisions(["a", "a/b"])


def test_check_name_is_one_component():
    assert check_name("run1") == "run1"
    with pytest.raises(UnsafePathError, match="one name"):
        check_name("a/b")


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=40))
def test_any_text_is_refused_or_safe(text):
    try:
        out = normalize_relpath(text)
    except UnsafePathError as e:
        assert str(e)  # every refusal says why
        return
    assert out == unicodedata.normalize("NFC", out)
    assert not out.startswith("/") and "\\" not in out
    parts = out.split("/")
    assert all(p not in ("", ".", "..") for p in parts)
    assert not any(unicodedata.category(c) == "Cc" for c in out)
    assert all(p[-1] not in ". " for p in parts)
    assert normalize_relpath(out) == out  # idempotent


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "..", ".", "", "c.d", "CON", "x y"]), min_size=1, max_size=5))
def test_joined_components(parts):
    path = "/".join(parts)
    bad = any(p in ("..", ".", "") or p.upper().startswith("CON") and p.split(".")[0].upper() == "CON"
              for p in parts)
    if bad:
        with pytest.raises(UnsafePathError):
            normalize_relpath(path)
    else:
        assert normalize_relpath(path) == path


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="abAB\u00e9e\u0301", min_size=1, max_size=3), min_size=2, max_size=6))
def test_collision_detection_matches_casefold(names):
    keys = [unicodedata.normalize("NFC", n).casefold() for n in names]
    if len(set(keys)) < len(keys):
        with pytest.raises(UnsafePathError):
            check_collisions(names)
    else:
        check_collisions(names)

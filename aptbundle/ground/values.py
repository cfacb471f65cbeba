"""Values read from a bundle, checked as values: numbers that are finite, JSON without duplicates.

Everything a bundle supplies is hostile until checked (``docs/ARCHITECTURE.md``): a number may be
a 4000-digit integer, ``1e999`` or NaN, and a JSON object may name a key twice (two parsers would
then disagree on what it says). These are the one place that decides.
"""

from __future__ import annotations

import math
from typing import Any


def finite_number(v: Any) -> float | None:
    """``v`` as a float when it is a finite int or float (not a bool), else None; an int too
    large for a float is not a number any run wrote.

    >>> finite_number(2), finite_number(float("nan")), finite_number(10 ** 400), finite_number(True)
    (2.0, None, None, None)
    """
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def is_finite(v: Any) -> bool:
    """True for a finite int or float (see ``finite_number``)."""
    return finite_number(v) is not None


class DuplicateKey(ValueError):
    """A JSON object names the same key twice."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for ``json.loads`` that refuses a key named twice.

    >>> import json; json.loads('{"a": 1, "a": 2}', object_pairs_hook=unique_keys)
    Traceback (most recent call last):
    ...
    aptbundle.ground.values.DuplicateKey: duplicate key 'a'
    """
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise DuplicateKey(f"duplicate key {k[:80]!r}")
        d[k] = v
    return d

"""Which parsed JSON values can be written back: integers within int64, finite numbers, JSON's own types.

``contract.py`` refuses a request holding any other value (naming its path), so no value can
break a response or a dead letter later; ``pipelines/settings.py`` checks its examples the same way.

Usage::

    unrepresentable({"n": 2**70}, "metadata")   # "metadata.n: integer outside the 64-bit signed range"
"""

from __future__ import annotations

import math
from typing import Any

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def unrepresentable(doc: Any, path: str) -> str | None:
    """Why a parsed JSON value cannot be written back (its path and reason), or None.

    Integers must fit in int64, numbers must be finite, and only JSON's own types are allowed.
    Iterative (no recursion limit); paths are built only once something is wrong.
    """
    todo: list[Any] = [doc]
    while todo:
        value = todo.pop()
        kind = type(value)
        if kind is dict:
            todo.extend(value.values())
        elif kind is list:
            todo.extend(value)
        elif value_problem(value) is not None:
            return _locate(doc, path)
    return None


def value_problem(value: Any) -> str | None:
    """Why one value (not a container) cannot be written back, or None."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return None
    if kind is int:
        return None if INT64_MIN <= value <= INT64_MAX else "integer outside the 64-bit signed range"
    if kind is float:
        return None if math.isfinite(value) else "number is not finite"
    return f"a {kind.__name__} is not a JSON value"


def _locate(doc: Any, path: str) -> str:
    todo: list[tuple[Any, str]] = [(doc, path)]
    while todo:
        value, where = todo.pop()
        if type(value) is dict:
            todo.extend((v, f"{where}.{_short(k)}") for k, v in value.items())
        elif type(value) is list:
            todo.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
        else:
            why = value_problem(value)
            if why is not None:
                return f"{where}: {why}"
    return f"{path}: cannot be encoded"


def _short(key: Any, limit: int = 40) -> str:
    text = str(key)
    return text if len(text) <= limit else text[:limit] + "..."

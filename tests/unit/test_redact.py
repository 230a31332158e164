from __future__ import annotations

import pytest

from streams.redact import Redactor, redact_url


def test_masks_every_occurrence_longest_first() -> None:
    redact = Redactor(["abcd1234", "abcd1234-long-form", "xy"])
    assert redact("k=abcd1234-long-form, k2=abcd1234 abcd1234") == "k=***, k2=*** ***"
    assert redact("xy stays: too short to be told from words") == (
        "xy stays: too short to be told from words")
    assert not Redactor(["", "ab"]) and Redactor(["abcd"])


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:pw-1@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("rediss://app:p%40ss@cache.example:6380/2", "rediss://app:***@cache.example:6380/2"),
    ("redis://app@cache", "redis://app@cache"),
    ("redis://:pw@[::1]:6379", "redis://:***@[::1]:6379"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown

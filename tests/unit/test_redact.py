from __future__ import annotations

import pytest

from streams.redact import Redactor, redact_url, url_secrets


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
    ("redis://h:6379/0?password=q-secret&db=2", "redis://h:6379/0?password=***&db=2"),
    ("https://u:p%3Aw@proxy/v1?api_key=k1&x=1", "https://u:***@proxy/v1?api_key=***&x=1"),
    ("redis://:pw@cache:notaport/0", "redis://:***@cache:notaport/0"),
    ("redis://[::1/0", "***"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_url_secrets_as_written_and_decoded() -> None:
    assert url_secrets("rediss://app:p%40ss@h:6380/0?password=a%2Bb&db=1") == [
        "p%40ss", "a%2Bb", "p@ss", "a+b"]
    assert url_secrets("redis://h:6379/0") == [] and url_secrets("not a url [") == []

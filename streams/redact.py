"""Keeping secrets out of text: log lines, error messages, dead letters.

Secrets are held as ``SecretStr`` in the settings, so they never reach text by accident of
formatting; ``Redactor`` is the last line of defence against text we do not control (an
upstream echoing a key back, an exception message quoting a URL).

Usage::

    redact = Redactor(settings.secret_values())
    log.warning("upstream said: %s", redact(message))
    redact_url("redis://app:s3cret@cache:6379/0")  # 'redis://app:***@cache:6379/0'
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
# Shorter "secrets" (a test password "x", an empty key) would mask ordinary words.
MIN_SECRET_CHARS = 4
# Query parameters that carry credentials (redis-py takes ?password=; some proxies ?key=).
_SECRET_PARAM = re.compile(r"pass|secret|token|key|auth|sig", re.IGNORECASE)


class Redactor:
    """Replaces every occurrence of the given secrets with ``***``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret containing another is masked whole.
        self._secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET_CHARS}, key=len,
                               reverse=True)

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text


def _secret_params(query: str) -> list[str]:
    """Raw values of the credential-like parameters of a query string."""
    found = []
    for piece in query.split("&"):
        name, sep, value = piece.partition("=")
        if sep and value and _SECRET_PARAM.search(unquote(name)):
            found.append(value)
    return found


def url_secrets(url: str) -> list[str]:
    """The secrets a URL holds: its password and credential-like query values, each as
    written and percent-decoded. Nothing for text that is not a URL."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = [parts.password] if parts.password else []
    found += _secret_params(parts.query)
    return found + [unquote(v) for v in found if unquote(v) != v]


def redact_url(url: str) -> str:
    """The URL with its password and credential-like query values replaced by ``***``;
    user, host, port, path and the other parameters kept."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK  # not readable as a URL: show none of it
    if parts.password is not None:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        parts = parts._replace(netloc=f"{userinfo.partition(':')[0]}:{MASK}@{hostport}")
    if _secret_params(parts.query):
        pieces = []
        for piece in parts.query.split("&"):
            name, sep, value = piece.partition("=")
            secret = sep and value and _SECRET_PARAM.search(unquote(name))
            pieces.append(f"{name}={MASK}" if secret else piece)
        parts = parts._replace(query="&".join(pieces))
    return urlunsplit(parts)

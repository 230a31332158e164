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

from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# Shorter "secrets" (a test password "x", an empty key) would mask ordinary words.
MIN_SECRET_CHARS = 4


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


def redact_url(url: str) -> str:
    """The URL with its password (if any) replaced by ``***``; user, host and path kept."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))

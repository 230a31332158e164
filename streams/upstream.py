"""One HTTP call to an OpenAI-compatible chat-completions endpoint, with a hard timeout.

The client never retries underneath: retries are the dispatcher's job, counted once.
aiohttp errors are translated here into the ``UpstreamError`` family.

``POST {url}/chat/completions[?api-version=...]`` with the key as ``Authorization: Bearer``
(OpenAI, vLLM, Ollama) or in the header ``api_key_header`` names (Azure OpenAI: ``api-key``).

Usage::

    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(session)
        body = await client.complete(endpoint, "gpt-4o-mini", messages, {"max_tokens": 64})
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson

from streams.config import EndpointConfig
from streams.errors import (
    UpstreamBadResponse,
    UpstreamConnectionError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from streams.redact import Redactor

_JSON = {"Content-Type": "application/json"}


def _duration(text: str) -> float | None:
    """Parse '1.5', '250ms', '2s', '1m30s' (OpenAI's x-ratelimit-reset-* style) to seconds."""
    text = text.strip()
    try:
        return max(float(text), 0.0)
    except ValueError:
        pass
    total, num = 0.0, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            num += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        if not num or unit not in ("ms", "s", "m", "h"):
            return None
        total += float(num) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        num = ""
        i += len(unit)
    return None if num else total


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the endpoint asked us to wait, from the headers it sent, or None.

    Honours ``retry-after-ms``, ``Retry-After`` (seconds or HTTP date) and
    ``x-ratelimit-reset-requests`` / ``-tokens`` (the longer of the two).
    """
    lower = {k.lower(): v for k, v in headers.items()}
    if "retry-after-ms" in lower:
        try:
            return max(float(lower["retry-after-ms"]) / 1000.0, 0.0)
        except ValueError:
            pass
    if "retry-after" in lower:
        value = lower["retry-after"].strip()
        try:
            return max(float(value), 0.0)
        except ValueError:
            try:
                when = parsedate_to_datetime(value).timestamp()
            except (TypeError, ValueError, IndexError):
                when = None
            if when is not None:
                return max(when - (time.time() if now is None else now), 0.0)
    resets = [
        d
        for k in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
        if k in lower and (d := _duration(lower[k])) is not None
    ]
    return max(resets) if resets else None


def request_target(endpoint: EndpointConfig) -> tuple[str, dict[str, str], dict[str, str]]:
    """URL, query parameters and headers of a chat-completions call to ``endpoint``."""
    headers = dict(_JSON)
    if endpoint.api_key is not None:
        key = endpoint.api_key.get_secret_value()
        if endpoint.api_key_header.lower() == "authorization":
            headers["Authorization"] = f"Bearer {key}"
        else:
            headers[endpoint.api_key_header] = key
    query = {"api-version": endpoint.api_version} if endpoint.api_version else {}
    return f"{endpoint.url}/chat/completions", query, headers


def _error_message(raw: bytes, status: int) -> str:
    """The upstream's own error message, short, for the dead letter."""
    try:
        doc = orjson.loads(raw)
        err = doc.get("error") if isinstance(doc, dict) else None
        msg = err.get("message") if isinstance(err, dict) else err
        if isinstance(msg, str) and msg:
            return f"HTTP {status}: {msg[:500]}"
    except orjson.JSONDecodeError:
        pass
    text = raw[:200].decode("utf-8", errors="replace").strip()
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


class UpstreamClient:
    """Calls ``{endpoint.url}/chat/completions``; one attempt per call."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def complete(
        self,
        endpoint: EndpointConfig,
        model: str,
        messages: list[dict[str, Any]],
        params: Mapping[str, Any],
    ) -> dict[str, Any]:
        payload = orjson.dumps({**params, "model": model, "messages": messages})
        url, query, headers = request_target(endpoint)
        name = endpoint.name
        try:
            async with asyncio.timeout(endpoint.timeout_seconds):
                async with self._session.post(
                    url, params=query, data=payload, headers=headers
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
                    if status >= 400:
                        # Some servers quote the key they refused: it must not reach a record.
                        redact = Redactor([endpoint.api_key.get_secret_value()]
                                          if endpoint.api_key else ())
                        raise UpstreamStatusError(
                            redact(_error_message(raw, status)),
                            endpoint=name,
                            status=status,
                            retry_after=parse_retry_after(resp.headers),
                        )
        except TimeoutError:
            raise UpstreamTimeout(
                f"no answer within {endpoint.timeout_seconds:g} s", endpoint=name
            ) from None
        except aiohttp.ClientError as exc:
            # The exception text can hold the URL; the URL holds no secret (keys go in headers).
            raise UpstreamConnectionError(
                f"connection failed: {type(exc).__name__}", endpoint=name
            ) from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamBadResponse(
                f"HTTP {status} with a body that is not JSON", endpoint=name, status=status
            ) from None
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
            raise UpstreamBadResponse(
                f"HTTP {status} without 'choices'", endpoint=name, status=status
            )
        return body

"""One HTTP call to an OpenAI-compatible chat-completions endpoint, with a hard timeout.

The client never retries underneath: retries are the dispatcher's job, counted once.
aiohttp errors are translated here into the ``UpstreamError`` family.

``POST {url}/chat/completions[?api-version=...]`` with the key as ``Authorization: Bearer``
(OpenAI, vLLM, Ollama) or in the header ``api_key_header`` names (Azure OpenAI: ``api-key``).

Nothing the endpoint sends is trusted: a body over ``max_response_bytes`` is not read, one
that is not a JSON object with ``choices`` (whatever its content type) is a bad response,
wait headers are parsed to bounded finite seconds (``parse_retry_after``), and an invalid
``usage`` is logged (at most once a minute per endpoint) and treated as unknown.

Usage::

    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(session)
        body = await client.complete(endpoint, "gpt-4o-mini", messages, {"max_tokens": 64})
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson

from streams.config import EndpointConfig
from streams.contract import ChatMessages, Params, usage_is_invalid
from streams.dispatch.retry import bounded_wait
from streams.errors import (
    UpstreamBadResponse,
    UpstreamConnectionError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from streams.redact import Redactor
from streams.structured import schema_as_instruction

log = logging.getLogger("streams.upstream")

_JSON = {"Content-Type": "application/json"}


# A wait longer than this is a broken header, not a rate limit (callers cap it further, by
# ``retry.max_retry_after_ms``); header values longer than this many characters are garbage.
MAX_WAIT_SECONDS = 86_400.0
_MAX_HEADER_CHARS = 64
# An /embeddings answer may be this large per input (3,072 floats as JSON take ~65 KB).
EMBEDDING_BYTES_PER_INPUT = 131_072
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ms|h|m|s))+")
_UNIT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _wait(seconds: float) -> float | None:
    return bounded_wait(seconds, MAX_WAIT_SECONDS)


def _seconds(text: str, scale: float = 1.0) -> float | None:
    """A plain non-negative decimal ('2', '1.5') times ``scale``: no sign, exponent, NaN or
    infinity (float() would take 'nan', 'inf', '1e999' and '1_0')."""
    text = text.strip()
    if len(text) > _MAX_HEADER_CHARS or not _NUMBER.fullmatch(text):
        return None
    return _wait(float(text) * scale)


def _duration(text: str) -> float | None:
    """Parse '1.5', '250ms', '2s', '1m30s' (OpenAI's x-ratelimit-reset-* style) to seconds."""
    plain = _seconds(text)
    if plain is not None:
        return plain
    text = text.strip()
    if len(text) > _MAX_HEADER_CHARS or not _DURATION.fullmatch(text):
        return None
    return _wait(sum(float(n) * _SECONDS[u] for n, u in _UNIT.findall(text)))


def _http_date(text: str, now: float | None) -> float | None:
    if len(text) > _MAX_HEADER_CHARS:
        return None
    try:
        when = parsedate_to_datetime(text.strip()).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return _wait(when - (time.time() if now is None else now))


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the endpoint asked us to wait, from the headers it sent, or None.

    Honours ``retry-after-ms``, ``Retry-After`` (seconds or HTTP date) and
    ``x-ratelimit-reset-requests`` / ``-tokens`` (the longer of the two), the first of
    these that parses. A value is a finite number of seconds in ``[0, MAX_WAIT_SECONDS]``;
    NaN, infinity, signs, exponents and garbage are ignored as if the header were absent.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    if "retry-after-ms" in lower and (ms := _seconds(lower["retry-after-ms"], 0.001)) is not None:
        return ms
    if "retry-after" in lower:
        value = lower["retry-after"]
        seconds = _seconds(value)
        if seconds is None:
            seconds = _http_date(value, now)
        if seconds is not None:
            return seconds
    resets = [
        d
        for k in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
        if k in lower and (d := _duration(lower[k])) is not None
    ]
    return max(resets) if resets else None


def request_target(endpoint: EndpointConfig, path: str = "/chat/completions"
                   ) -> tuple[str, dict[str, str], dict[str, str]]:
    """URL, query parameters and headers of a call to ``endpoint`` (chat completions by default)."""
    headers = dict(_JSON)
    if endpoint.api_key is not None:
        key = endpoint.api_key.get_secret_value()
        if endpoint.api_key_header.lower() == "authorization":
            headers["Authorization"] = f"Bearer {key}"
        else:
            headers[endpoint.api_key_header] = key
    query = {"api-version": endpoint.api_version} if endpoint.api_version else {}
    return f"{endpoint.url}{path}", query, headers


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


async def _read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None once it passes ``limit`` bytes (the rest is never read)."""
    length = resp.content_length
    if length is not None and length > limit:
        return None
    if length is not None and not resp.headers.get("Content-Encoding"):
        return await resp.read()  # the fast path; a compressed length says nothing of the size
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(65_536):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class UpstreamClient:
    """Calls ``{endpoint.url}/chat/completions``; one attempt per call.

    ``log_interval``: an endpoint's invalid ``usage`` is logged at most this often.
    """

    def __init__(self, session: aiohttp.ClientSession, *, log_interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 embedding_bytes_per_input: int = EMBEDDING_BYTES_PER_INPUT) -> None:
        self._session = session
        self._embedding_bytes = embedding_bytes_per_input
        self._log_interval = log_interval
        self._clock = clock
        self._usage_logged: dict[str, float] = {}  # endpoint -> when last logged

    async def complete(self, endpoint: EndpointConfig, model: str, messages: ChatMessages,
                       params: Params) -> dict[str, Any]:
        if not endpoint.structured_outputs and "response_format" in params:
            messages, params = schema_as_instruction(messages, params)
        payload = orjson.dumps({**params, "model": model, "messages": messages})
        raw, status = await self.post(endpoint, "/chat/completions", payload)
        return self._completion(raw, status, endpoint)

    async def embed(self, endpoint: EndpointConfig, model: str, inputs: list[str],
                    params: Params) -> dict[str, Any]:
        """One ``/embeddings`` call for many inputs: the JSON body (``vectors.read_vectors``
        checks it). Its size limit grows with the inputs (``embedding_bytes_per_input``)."""
        payload = orjson.dumps({**params, "model": model, "input": inputs})
        limit = max(endpoint.max_response_bytes, self._embedding_bytes * len(inputs))
        raw, status = await self.post(endpoint, "/embeddings", payload, limit)
        if raw is None:
            raise UpstreamBadResponse(f"HTTP {status} with a body over {limit} bytes",
                                      endpoint=endpoint.name, status=status)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamBadResponse(f"HTTP {status} with a body that is not JSON",
                                      endpoint=endpoint.name, status=status) from None
        if not isinstance(body, dict):
            raise UpstreamBadResponse(f"HTTP {status} with a body that is not an object",
                                      endpoint=endpoint.name, status=status)
        if usage_is_invalid(body):
            self._log_invalid_usage(endpoint.name, body["usage"])
        return body

    async def post(self, endpoint: EndpointConfig, path: str, payload: bytes,
                   limit: int | None = None) -> tuple[bytes | None, int]:
        """One POST of ``payload`` to ``{url}{path}``: the body (None: over the size limit)
        and the status of a 2xx/3xx answer; failures raise the ``UpstreamError`` family."""
        url, query, headers = request_target(endpoint, path)
        name = endpoint.name
        limit = endpoint.max_response_bytes if limit is None else limit
        try:
            async with asyncio.timeout(endpoint.timeout_seconds):
                async with self._session.post(
                    url, params=query, data=payload, headers=headers
                ) as resp:
                    raw = await _read_body(resp, limit)
                    status = resp.status
                    if status >= 400:
                        # Some servers quote the key they refused: it must not reach a record.
                        redact = Redactor([endpoint.api_key.get_secret_value()]
                                          if endpoint.api_key else ())
                        raise UpstreamStatusError(
                            redact(_error_message(raw or b"", status)),
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
        return raw, status

    def _completion(self, raw: bytes | None, status: int, endpoint: EndpointConfig) -> dict[str, Any]:
        name = endpoint.name
        if raw is None:
            raise UpstreamBadResponse(
                f"HTTP {status} with a body over max_response_bytes "
                f"({endpoint.max_response_bytes})", endpoint=name, status=status,
            )
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
        if usage_is_invalid(body):
            self._log_invalid_usage(name, body["usage"])
        return body

    def _log_invalid_usage(self, name: str, usage: Any) -> None:
        now = self._clock()
        last = self._usage_logged.get(name)
        if last is not None and now - last < self._log_interval:
            return
        self._usage_logged[name] = now
        shown = orjson.dumps(usage)[:200].decode(errors="replace")
        log.warning("endpoint %s sent an invalid usage (not counted, not charged; logged at "
                    "most every %g s): %s", name, self._log_interval, shown)

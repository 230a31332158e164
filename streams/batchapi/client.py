"""The HTTP side of a Batch API: ``/files`` (upload, content) and ``/batches`` (create, retrieve,
cancel, list), OpenAI and Azure OpenAI style, under the endpoint's ``url``.

Authentication and ``api-version`` are the endpoint's, as for chat completions. Every call
is bounded by the endpoint's ``timeout_seconds``; an error answer raises ``BatchApiError``
with the status and a short reason (secrets masked), never the raw body.

Usage::

    client = BatchClient(session)
    file_id = await client.upload(endpoint, jsonl_bytes)
    batch = await client.create(endpoint, file_id, metadata={"llm_streams_job": "3:0/a/m"})
    batch = await client.retrieve(endpoint, batch["id"])
    data = await client.content(endpoint, batch["output_file_id"])
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from streams.config import EndpointConfig
from streams.dispatch.upstream import request_target
from streams.redact import Redactor

# Batch states (OpenAI): validating, in_progress, finalizing, completed, failed, expired,
# cancelling, cancelled.
DONE_STATES = frozenset({"completed", "failed", "expired", "cancelled"})
MAX_FILE_BYTES = 200 * 1_048_576  # OpenAI's limit for a batch input file


class BatchApiError(Exception):
    """A /files or /batches call failed (status 0: no HTTP answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class BatchClient:
    """See the module docstring; the session is the caller's."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def upload(self, endpoint: EndpointConfig, data: bytes) -> str:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", data, filename="requests.jsonl",
                       content_type="application/jsonl")
        doc = await self._call(endpoint, "POST", "/files", data=form)
        return _text(doc, "id")

    async def create(self, endpoint: EndpointConfig, file_id: str,
                     metadata: dict[str, str]) -> dict[str, Any]:
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                "completion_window": "24h", "metadata": metadata}
        return await self._call(endpoint, "POST", "/batches", json=body)

    async def retrieve(self, endpoint: EndpointConfig, batch_id: str) -> dict[str, Any]:
        return await self._call(endpoint, "GET", f"/batches/{batch_id}")

    async def cancel(self, endpoint: EndpointConfig, batch_id: str) -> dict[str, Any]:
        return await self._call(endpoint, "POST", f"/batches/{batch_id}/cancel")

    async def find(self, endpoint: EndpointConfig, key: str, value: str) -> dict[str, Any] | None:
        """The most recent batch whose ``metadata[key] == value`` (the first 100 listed)."""
        doc = await self._call(endpoint, "GET", "/batches", params={"limit": "100"})
        for batch in doc.get("data") or ():
            meta = batch.get("metadata") if isinstance(batch, dict) else None
            if isinstance(meta, dict) and meta.get(key) == value:
                return dict(batch)
        return None

    async def content(self, endpoint: EndpointConfig, file_id: str) -> bytes:
        url, query, headers = self._target(endpoint, f"/files/{file_id}/content")
        timeout = aiohttp.ClientTimeout(total=endpoint.timeout_seconds)
        try:
            async with self._session.get(url, params=query, headers=headers,
                                         timeout=timeout) as resp:
                raw = await _read(resp, MAX_FILE_BYTES + 1)
                if resp.status != 200:
                    raise BatchApiError(f"file {file_id}: status {resp.status}", resp.status)
                if len(raw) > MAX_FILE_BYTES:
                    raise BatchApiError(f"file {file_id} is over {MAX_FILE_BYTES} bytes")
                return raw
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BatchApiError(f"file {file_id}: {type(exc).__name__}") from None

    def _target(self, endpoint: EndpointConfig, path: str
                ) -> tuple[str, dict[str, str], dict[str, str]]:
        url, query, headers = request_target(endpoint)
        headers.pop("Content-Type", None)
        return url.removesuffix("/chat/completions") + path, query, headers

    async def _call(self, endpoint: EndpointConfig, method: str, path: str,
                    params: dict[str, str] | None = None, **kw: Any) -> dict[str, Any]:
        url, query, headers = self._target(endpoint, path)
        timeout = aiohttp.ClientTimeout(total=endpoint.timeout_seconds)
        try:
            async with self._session.request(method, url, params={**query, **(params or {})},
                                             headers=headers, timeout=timeout, **kw) as resp:
                raw = await _read(resp, 1_048_576)
                if resp.status != 200:
                    redact = Redactor([endpoint.api_key.get_secret_value()]
                                      if endpoint.api_key else ())
                    reason = redact(raw[:200].decode("utf-8", "replace"))
                    raise BatchApiError(f"{method} {path}: status {resp.status}: {reason}",
                                        resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BatchApiError(f"{method} {path}: {type(exc).__name__}") from None
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BatchApiError(f"{method} {path}: answer is not JSON") from None
        if not isinstance(doc, dict):
            raise BatchApiError(f"{method} {path}: answer is not an object")
        return doc


async def _read(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body up to ``limit`` bytes (read on until the end: one read returns what arrived)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await resp.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _text(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise BatchApiError(f"answer without {key!r}")
    return value

"""The JSONL of a batch job: one input line per distinct request, and its output and error lines.

Input lines follow OpenAI's batch format (``custom_id``, ``method``, ``url``, ``body``); the
``custom_id`` is the parked offset of the first request of the line (identical requests
share a line). Output and error files are read line by line: a line that is not JSON, not
an object, or not a 200 with a chat-completion body is a failed line (the request goes the
normal path); the provider's text is never trusted further than that.

Usage::

    data = input_file([(custom_id, model, messages, params), ...])
    results = read_results(output_bytes + b"\\n" + error_bytes)   # custom_id -> Result
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

CHAT_URL = "/v1/chat/completions"


@dataclass(slots=True, frozen=True)
class Result:
    """One line's outcome: the completion body (``ok``) or why it failed."""

    body: dict[str, Any] | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.body is not None


def input_line(custom_id: str, model: str, messages: list[dict[str, Any]],
               params: Mapping[str, Any]) -> bytes:
    body = {**params, "model": model, "messages": messages}
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT_URL, "body": body})


def input_file(lines: Iterable[tuple[str, str, list[dict[str, Any]], Mapping[str, Any]]]) -> bytes:
    return b"".join(input_line(*line) + b"\n" for line in lines)


def read_results(data: bytes) -> dict[str, Result]:
    """Every line's result by ``custom_id``; a success wins over a failure of the same id."""
    out: dict[str, Result] = {}
    for raw in data.splitlines():
        if not raw.strip():
            continue
        parsed = _read_line(raw)
        if parsed is None:
            continue
        cid, result = parsed
        if cid not in out or (result.ok and not out[cid].ok):
            out[cid] = result
    return out


def _read_line(raw: bytes) -> tuple[str, Result] | None:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("custom_id"), str):
        return None
    cid: str = doc["custom_id"]
    error = doc.get("error")
    response = doc.get("response")
    if error:
        return cid, Result(None, _describe(error))
    if not isinstance(response, dict):
        return cid, Result(None, "line without a response")
    status = response.get("status_code")
    body = response.get("body")
    if status != 200:
        return cid, Result(None, f"status {status!r}")
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list) \
            or not body["choices"]:
        return cid, Result(None, "response body is not a chat completion")
    return cid, Result(body, None)


def _describe(error: Any) -> str:
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        return f"{code}: {message}"[:500]
    return str(error)[:500]

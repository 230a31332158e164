"""The mock's ``POST /v1/embeddings``: deterministic vectors derived from each input.

``vector_for(text, dims)`` is the vector of one input (float32 values in [-1, 1) from a
SHAKE-256 digest of the text), so a test can check that each record got its own. A call
costs the mock's ``latency_ms`` (plus jitter) once and ``embed_input_ms`` per input; it is
refused with 400 when one of its inputs is in ``refuse_inputs``; the status faults, ``hang``
and ``reset`` of the chaos mix apply as to chat calls. ``usage`` counts ~4 characters per
token per input (at least 1), as the worker estimates. Each call is logged with its inputs
(``/stats?log=1``: ``calls_log[i]["inputs"]``).

Usage::

    from mockllm.embeddings import vector_for
    assert record["embedding"] == vector_for("some text", 16)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from array import array
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from mockllm.server import MockLLM

DEFAULT_DIMENSIONS = 16
MAX_DIMENSIONS = 4_096


def vector_for(text: str, dims: int = DEFAULT_DIMENSIONS) -> list[float]:
    """The mock's embedding of ``text``: ``dims`` float32 values in [-1, 1)."""
    raw = hashlib.shake_256(text.encode("utf-8")).digest(4 * dims)
    ints = array("I")
    ints.frombytes(raw)
    return array("f", (n / 2_147_483_648.0 - 1.0 for n in ints)).tolist()


def vector_base64(text: str, dims: int = DEFAULT_DIMENSIONS) -> str:
    """``vector_for`` as OpenAI's ``encoding_format: base64`` sends it (little-endian float32)."""
    return base64.b64encode(array("f", vector_for(text, dims)).tobytes()).decode("ascii")


def input_tokens(text: str) -> int:
    """What the mock counts for one input (and the worker estimates): ~4 characters a token."""
    return max(1, (len(text) + 3) // 4)


def embeddings_body(model: str, inputs: list[str], dims: int, encoding: str) -> dict[str, Any]:
    vec = vector_base64 if encoding == "base64" else vector_for
    tokens = sum(input_tokens(t) for t in inputs)
    return {
        "object": "list",
        "model": model,
        "data": [{"object": "embedding", "index": i, "embedding": vec(t, dims)}
                 for i, t in enumerate(inputs)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _inputs(body: Any) -> list[str] | None:
    if not isinstance(body, dict):
        return None
    given = body.get("input")
    if isinstance(given, str):
        return [given]
    if isinstance(given, list) and given and all(isinstance(t, str) for t in given):
        return given
    return None


async def handle_embeddings(mock: MockLLM, request: web.Request) -> web.StreamResponse:
    """``POST /v1/embeddings`` (see the module docstring)."""
    now = time.time()
    b = mock.behaviour
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return mock._error(400, "request body is not JSON", now)
    inputs = _inputs(body)
    dims = body.get("dimensions", DEFAULT_DIMENSIONS) if isinstance(body, dict) else 0
    if inputs is None or type(dims) is not int or not 1 <= dims <= MAX_DIMENSIONS:
        return mock._error(400, "'input' (strings) and a valid 'dimensions' are required", now)
    for text in inputs:
        mock.stats.prompts[text] += 1
    fault = mock._draw_fault()
    cut = await mock.cut_off(fault, request, now, None)
    if cut is not None:  # a reset or a hang: logged without its inputs
        return cut
    delay = mock.delay_ms() + b.embed_input_ms * len(inputs)
    if delay > 0:
        await asyncio.sleep(delay / 1000.0)
    refuse = set(b.refuse_inputs)
    refused = [i for i, t in enumerate(inputs) if t in refuse]
    status = 0
    if refused:
        status = 400
    elif fault.isdigit():
        status = int(fault)
    elif b.down or (b.error_rate and mock._rng.random() < b.error_rate):
        status = b.status_on_error
    if status:
        retry_after = (b.retry_after or 1.0) if status in (429, 503) else b.retry_after
        message = f"input {refused[0]} refused by the mock" if refused else "mock failure"
        response = mock._error(status, message, now, None, fault, retry_after)
    else:
        mock.stats.ok += 1
        mock.stats.record(now, 200, None)
        encoding = "base64" if body.get("encoding_format") == "base64" else "float"
        payload = embeddings_body(str(body.get("model", "mock")), inputs, dims, encoding)
        response = web.Response(body=orjson.dumps(payload), content_type="application/json")
    mock.stats.entries[-1]["inputs"] = inputs
    return response

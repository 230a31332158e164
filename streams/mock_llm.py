"""An OpenAI-compatible mock endpoint for the demo, the tests and the benchmarks.

POST /v1/chat/completions answers deterministically from the prompt, with a usage block.
GET /stats returns counts (calls, statuses, distinct prompts, duplicate calls, the busiest
1-second window); POST /reset clears them; POST /config changes behaviour at run time
(JSON with any of latency_ms, jitter_ms, error_rate, status_on_error, retry_after, down).

Usage::

    llm-streams mock-llm --port 8001 --latency-ms 50 --error-rate 0.1 --status-on-error 429
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class MockBehaviour:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    status_on_error: int = 500
    retry_after: float | None = None
    down: bool = False  # answer every call with status_on_error


@dataclass
class MockStats:
    calls: int = 0
    ok: int = 0
    by_status: collections.Counter[int] = field(default_factory=collections.Counter)
    prompts: collections.Counter[str] = field(default_factory=collections.Counter)
    times: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=1_000_000))
    statuses: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=1_000_000))

    def record(self, when: float, status: int) -> None:
        self.calls += 1
        self.by_status[status] += 1
        self.times.append(when)
        self.statuses.append(status)

    def summary(self, with_log: bool = False) -> dict[str, Any]:
        """Counts; with_log adds every call's (time, status) and the prompts called twice."""
        dup = sum(n - 1 for n in self.prompts.values() if n > 1)
        return {
            "calls": self.calls,
            "ok": self.ok,
            "by_status": {str(k): v for k, v in self.by_status.items()},
            "distinct_prompts": len(self.prompts),
            "duplicate_calls": dup,
            "max_per_second": _max_window(list(self.times), 1.0),
            "first_call": self.times[0] if self.times else None,
            "last_call": self.times[-1] if self.times else None,
            **({"log": list(zip(self.times, self.statuses, strict=False)),
                "duplicate_prompts": [p for p, n in self.prompts.items() if n > 1]}
               if with_log else {}),
        }


def _max_window(times: list[float], width: float) -> int:
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _prompt_text(body: dict[str, Any]) -> str:
    parts = []
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        parts.append(content if isinstance(content, str) else orjson.dumps(content).decode())
    return "\n".join(parts)


def completion_body(model: str, prompt: str) -> dict[str, Any]:
    digest = hashlib.blake2b(prompt.encode(), digest_size=6).hexdigest()
    text = f"mock answer {digest}: {prompt[:48]}"
    prompt_tokens = max(1, len(prompt) // 4)
    completion_tokens = max(1, len(text) // 4)
    return {
        "id": f"chatcmpl-{digest}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class MockLLM:
    """The mock's state and handlers; ``app()`` builds the aiohttp application."""

    def __init__(self, behaviour: MockBehaviour, rng: random.Random | None = None) -> None:
        self.behaviour = behaviour
        self.stats = MockStats()
        self._rng = rng or random.Random()

    async def chat(self, request: web.Request) -> web.Response:
        now = time.time()
        b = self.behaviour
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._error(400, "request body is not JSON", now)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return self._error(400, "'messages' is required", now)
        prompt = _prompt_text(body)
        self.stats.prompts[prompt] += 1
        delay = b.latency_ms + (self._rng.uniform(-b.jitter_ms, b.jitter_ms) if b.jitter_ms else 0)
        if delay > 0:
            await asyncio.sleep(delay / 1000.0)
        if b.down or (b.error_rate and self._rng.random() < b.error_rate):
            return self._error(b.status_on_error, "mock failure", now)
        self.stats.ok += 1
        self.stats.record(now, 200)
        payload = completion_body(str(body.get("model", "mock")), prompt)
        payload["mock"] = {"latency_ms": max(0.0, delay)}  # the benchmark subtracts it per request
        return web.Response(body=orjson.dumps(payload), content_type="application/json")

    def _error(self, status: int, message: str, now: float) -> web.Response:
        self.stats.record(now, status)
        headers = {}
        if self.behaviour.retry_after is not None:
            headers["Retry-After"] = f"{self.behaviour.retry_after:g}"
        doc = {"error": {"message": message, "type": "mock_error", "code": status}}
        return web.Response(
            status=status, body=orjson.dumps(doc), content_type="application/json", headers=headers
        )

    async def get_stats(self, request: web.Request) -> web.Response:
        with_log = request.query.get("log") == "1"
        return web.json_response(self.stats.summary(with_log), dumps=lambda o: orjson.dumps(o).decode())

    async def reset(self, request: web.Request) -> web.Response:
        self.stats = MockStats()
        return web.json_response({"reset": True})

    async def configure(self, request: web.Request) -> web.Response:
        changes = orjson.loads(await request.read() or b"{}")
        for key, value in changes.items():
            if not hasattr(self.behaviour, key):
                return web.json_response({"error": f"unknown key {key}"}, status=400)
            setattr(self.behaviour, key, value)
        return web.json_response(asdict(self.behaviour))

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/stats", self.get_stats)
        app.router.add_post("/reset", self.reset)
        app.router.add_post("/config", self.configure)
        return app


def run_mock(host: str, port: int, behaviour: MockBehaviour) -> None:
    """Serve until interrupted (the CLI's ``mock-llm``)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    web.run_app(
        MockLLM(behaviour).app(), host=host, port=port, access_log=None, print=None,
        backlog=4096,
    )

"""Log lines: every line about a request carries its id (JSON field, text tag); no secret."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry

from mockllm.server import MockBehaviour, MockLLM
from streams.config import Settings, load_settings
from streams.contract import Completion, Request, Source
from streams.dispatch.parts import build_dispatcher
from streams.dispatch.upstream import UpstreamClient
from streams.intake.processor import InRecord, Processor
from streams.logs import JsonFormatter, TextFormatter, request_extra
from streams.metrics import PipelineMetrics
from streams.redact import Redactor
from tests.fakes.mock_server import serving_mock
from tests.fakes.publisher import FakePublisher

KEY = "sk-live-secret-4b1c9e"


def _record(msg: str, *args: object, exc: bool = False, **extra: Any) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError(f"failed with {KEY}")
        except RuntimeError as e:
            exc_info = (type(e), e, e.__traceback__)
    record = logging.LogRecord("streams.processor", logging.WARNING, __file__, 1, msg, args,
                               exc_info)
    record.__dict__.update(extra)
    return record


def test_json_line_has_request_id_field_and_masks_secrets() -> None:
    fmt = JsonFormatter(Redactor([KEY]))
    doc = orjson.loads(fmt.format(_record("key %s refused", KEY, exc=True,
                                          **request_extra("req-7"))))
    assert doc["request_id"] == "req-7" and doc["level"] == "warning"
    assert doc["message"] == "key *** refused"
    assert "RuntimeError: failed with ***" in doc["exception"]
    assert KEY not in orjson.dumps(doc).decode()
    assert "request_id" not in orjson.loads(fmt.format(_record("not about a request")))


def test_text_line_shows_request_id_and_quotes_odd_ones() -> None:
    fmt = TextFormatter(Redactor([KEY]))
    line = fmt.format(_record("dead letter %s", "exhausted", **request_extra("req-7")))
    assert line.endswith("WARNING streams.processor [req-7]: dead letter exhausted")
    forged = fmt.format(_record("x", **request_extra("a]\n2026 ERROR forged")))
    assert "\n" not in forged and '["a]\\n2026 ERROR forged"]' in forged
    assert fmt.format(_record("plain")).endswith("streams.processor: plain")
    out = fmt.format(_record("with %s", KEY, exc=True))
    assert KEY not in out and "with ***" in out and "failed with ***" in out


class Exploding:
    """An answerer with a bug whose message quotes a secret."""

    async def dispatch(self, req: Request) -> Completion:
        raise RuntimeError(f"bug while holding {KEY}")


@pytest.fixture
async def llm() -> AsyncIterator[tuple[MockLLM, str]]:
    async with serving_mock(MockBehaviour(down=True, status_on_error=503)) as served:
        yield served


def _settings(url: str) -> Settings:
    return load_settings(
        environ={"K": KEY},
        endpoints=[{"name": "ep", "url": url, "api_key_env": "K", "timeout_seconds": 5}],
        retry={"max_attempts": 3, "base_delay_ms": 1, "max_delay_ms": 2,
               "cooldown_after_failures": 100},
    )


def _rec(offset: int, doc: object) -> InRecord:
    return InRecord(Source("llm.requests", 0, offset, 0), None, orjson.dumps(doc))


async def test_every_line_of_a_failing_request_carries_its_id(
    llm: tuple[MockLLM, str], caplog: pytest.LogCaptureFixture
) -> None:
    mock, url = llm
    settings = _settings(url)
    published = FakePublisher()
    text, json = TextFormatter(Redactor([KEY])), JsonFormatter(Redactor([KEY]))
    seen: dict[str, int] = {}

    async def run(processor: Processor, rid: str, doc: object) -> None:
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="streams"):
            await processor.process_batch([_rec(len(seen), doc)], lambda rec, outcome: None)
        mine = [r for r in caplog.records if r.name.startswith("streams")]
        seen[rid] = len(mine)
        for record in mine:
            assert getattr(record, "request_id", None) == rid, record.getMessage()
            assert f"[{rid}]" in text.format(record)
            assert orjson.loads(json.format(record))["request_id"] == rid
            assert KEY not in text.format(record) and KEY not in json.format(record)

    async with aiohttp.ClientSession() as session, build_dispatcher(
        settings, UpstreamClient(session), None, CollectorRegistry()
    ) as dispatcher:
        metrics = PipelineMetrics(CollectorRegistry())
        processor = Processor(settings, published, dispatcher, None, metrics)
        await run(processor, "r-exhausted", {"id": "r-exhausted", "input": "hi"})
        mock.behaviour.status_on_error = 400
        await run(processor, "r-refused", {"id": "r-refused", "input": "hi"})
        await run(processor, "r-invalid", {"id": "r-invalid", "input": 42})
        buggy = Processor(settings, published, Exploding(), None, metrics)
        await run(buggy, "r-bug", {"id": "r-bug", "input": "hi"})

    # two retries and the dead letter; the dead letter; the validation note; the traceback
    # and the dead letter
    assert seen == {"r-exhausted": 3, "r-refused": 1, "r-invalid": 1, "r-bug": 2}
    kinds = {doc["id"]: doc["error"]["type"] for _, _, doc in published.out}
    assert kinds == {"r-exhausted": "exhausted", "r-refused": "upstream",
                     "r-invalid": "validation", "r-bug": "internal"}
    assert all(KEY not in orjson.dumps(doc).decode() for _, _, doc in published.out)

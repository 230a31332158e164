"""The direct-delivery consumer: when it may skip faust's wait_first, and the copy's guard."""

from __future__ import annotations

import hashlib
import inspect
from types import SimpleNamespace
from typing import Any

import pytest
from faust.transport.consumer import Consumer

from streams import faust_io
from streams.config import load_settings
from streams.faust_io import DirectDeliveryConsumer, DirectDeliveryTransport
from streams.worker import Runtime, build_app


def test_copied_drain_matches_the_installed_faust() -> None:
    # Our _drain_messages is faust's with one change: a new faust must be reviewed first.
    src = inspect.getsource(Consumer._drain_messages)
    assert hashlib.sha256(src.encode()).hexdigest() == faust_io.UPSTREAM_DRAIN_SHA256


class _Flag:
    def __init__(self, value: bool) -> None:
        self.value = value

    def is_set(self) -> bool:
        return self.value

    def is_active(self) -> bool:
        return self.value


class _Queue:
    def __init__(self, full: bool) -> None:
        self._full = full

    def full(self) -> bool:
        return self._full


def _consumer(*, suspended: bool = False, active: bool = True,
              queues: list[bool] | None = None) -> Any:
    chans = [SimpleNamespace(queue=_Queue(f)) for f in ([False] if queues is None else queues)]
    index = {"tp": chans} if queues != [] else {}
    fake = SimpleNamespace(
        suspend_flow=_Flag(suspended),
        app=SimpleNamespace(flow_control=_Flag(active), topics=SimpleNamespace(_tp_index=index)),
    )
    return fake


@pytest.mark.parametrize(
    ("state", "direct"),
    [
        ({}, True),
        ({"queues": [False, False]}, True),
        ({"suspended": True}, False),  # a rebalance began: faust's path can abandon delivery
        ({"active": False}, False),  # flow control holds deliveries (rebalancing)
        ({"queues": [False, True]}, False),  # a full buffer would block the delivery
        ({"queues": []}, False),  # a partition the conductor does not know
    ],
)
def test_direct_only_when_the_delivery_cannot_block(state: dict[str, Any], direct: bool) -> None:
    fake = _consumer(**state)
    assert DirectDeliveryConsumer._can_deliver_now(fake, "tp") is direct


def test_the_worker_app_uses_the_direct_transport() -> None:
    settings = load_settings(environ={})
    app = build_app(settings, Runtime(settings))
    assert isinstance(app.transport, DirectDeliveryTransport)
    assert app.transport.Consumer is DirectDeliveryConsumer


async def test_a_commit_of_only_revoked_partitions_is_skipped_not_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # faust would hand aiokafka an empty dict (ValueError, the worker crashes).
    from faust.transport.drivers import aiokafka as driver
    from faust.types import TP

    calls: list[dict[Any, int]] = []

    async def faust_commit(self: Any, offsets: dict[Any, int]) -> bool:
        calls.append(dict(offsets))
        return True

    monkeypatch.setattr(driver.AIOKafkaConsumerThread, "_commit", faust_commit)
    thread = object.__new__(faust_io._ConsumerThread)
    mine, gone = TP("t", 0), TP("t", 1)
    thread.assignment = lambda: {mine}  # type: ignore[method-assign]
    assert await thread._commit({gone: 5}) is False
    assert calls == []
    assert await thread._commit({mine: 7, gone: 5}) is True
    assert calls == [{mine: 7, gone: 5}]  # faust's own commit filters the rest

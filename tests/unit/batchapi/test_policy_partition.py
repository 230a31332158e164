"""Which requests are parked (the policy), and how a parked partition cuts, falls back and commits."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from streams.batchapi.jobs import Cut
from streams.batchapi.metrics import BatchMetrics
from streams.batchapi.parking import ParkedRecord
from streams.batchapi.partition import ActiveCut, Held, PartitionJobs
from streams.batchapi.policy import BatchPolicy
from streams.config import Settings, load_settings
from streams.contract import Request, Source, parse_request
from streams.errors import ConfigError, ValidationFailed

NOW = 1_800_000_000.0


def _settings(**policy: Any) -> Settings:
    return Settings(
        endpoints=[{"name": "b", "url": "http://b.test/v1", "batch_api": True, "models": ["m"]},
                   {"name": "n", "url": "http://n.test/v1"}],
        batch_api={"enabled": True, **policy})


def _policy(**policy: Any) -> tuple[BatchPolicy, BatchMetrics]:
    metrics = BatchMetrics(CollectorRegistry())
    return BatchPolicy(_settings(**policy), metrics, clock=lambda: NOW), metrics


@settings(deadline=None)  # a loaded machine: no per-example deadline
@given(priority=st.integers(0, 9), slack=st.none() | st.floats(-100, 10_000),
       flag=st.sampled_from([None, True, False]), model=st.sampled_from(["m", "other"]),
       kind=st.sampled_from(["chat", "embedding"]))
def test_the_policy_parks_exactly_what_the_contract_says(
    priority: int, slack: float | None, flag: bool | None, model: str, kind: str
) -> None:
    policy, _ = _policy(min_priority=7, min_slack_seconds=3600, fallback_slack_seconds=600)
    deadline = None if slack is None else int((NOW + slack) * 1000)
    req = Request(id="r", input="x", model=model, priority=priority, deadline=deadline,
                  batch_api=flag, kind=kind)
    if flag is False or model != "m" or kind == "embedding":  # embeddings never go to a job
        expected = False
    elif flag is True:
        expected = slack is None or slack > 600
    else:
        expected = priority >= 7 and (slack is None or slack >= 3600)
    assert policy.wants(req) is expected


def test_a_tenant_with_budgets_takes_the_normal_path_where_its_budgets_hold() -> None:
    # A job's lines were paid with no reservation against the tenant's budgets: a tenant could
    # spend past its budget through the Batch API.
    metrics = BatchMetrics(CollectorRegistry())
    settings = _settings().model_copy(update={"tenants": load_settings(environ={}, tenants={
        "capped": {"budgets": [{"window": "day", "cost": 5.0}]}, "free": {"weight": 2}}).tenants})
    policy = BatchPolicy(settings, metrics, clock=lambda: NOW)
    for tenant, parked in (("capped", False), ("free", True), (None, True), ("other", True)):
        for flag in (True, None):
            req = Request(id="r", input="x", model="m", priority=9, batch_api=flag, tenant=tenant)
            assert policy.wants(req) is parked, (tenant, flag)
    assert metrics.fallbacks.labels("budget")._value.get() == 2
    # the budgets of ``default`` apply to every tenant not named, and to requests without one
    settings = _settings().model_copy(update={"tenants": load_settings(environ={}, tenants={
        "default": {"budgets": [{"window": "hour", "tokens": 1000}]}, "free": {}}).tenants})
    policy = BatchPolicy(settings, metrics, clock=lambda: NOW)
    assert not policy.wants(Request(id="r", input="x", model="m", priority=9))
    assert not policy.wants(Request(id="r", input="x", model="m", priority=9, tenant="other"))
    assert policy.wants(Request(id="r", input="x", model="m", priority=9, tenant="free"))


def test_a_request_for_batch_without_a_batch_endpoint_is_counted() -> None:
    policy, metrics = _policy()
    assert not policy.wants(Request(id="r", input="x", model="other", batch_api=True))
    assert metrics.fallbacks.labels("no_endpoint")._value.get() == 1


def test_disabled_parks_nothing() -> None:
    policy = BatchPolicy(Settings(batch_api={"enabled": False}), BatchMetrics(CollectorRegistry()))
    assert not policy.enabled
    assert not policy.wants(Request(id="r", input="x", model="gpt-4o-mini", batch_api=True))


def test_the_config_refuses_a_fallback_slack_over_the_minimum() -> None:
    with pytest.raises(ConfigError, match="batch_api"):
        load_settings(batch_api={"min_slack_seconds": 60, "fallback_slack_seconds": 600})
    with pytest.raises(ConfigError, match="poll_seconds"):
        load_settings(batch_api={"poll_seconds": 0})


def test_the_request_field_is_a_bool_or_null() -> None:
    assert parse_request(b'{"id":"a","input":"x","batch_api":true}', max_bytes=1000,
                         default_model="m").batch_api is True
    with pytest.raises(ValidationFailed, match="batch_api"):
        parse_request(b'{"id":"a","input":"x","batch_api":"yes"}', max_bytes=1000,
                      default_model="m")


class _Part:
    """A PartitionJobs with recording callbacks."""

    def __init__(self, stored: list[Cut] | None = None, max_per_job: int = 3,
                 max_wait: float = 10.0, fallback: float = 60.0) -> None:
        self.started: list[ActiveCut] = []
        self.normal: list[tuple[list[int], str]] = []
        self.pj = PartitionJobs(0, stored or [], self._start, self._normal, max_per_job,
                                max_wait, fallback)

    def _start(self, pj: PartitionJobs, active: ActiveCut) -> asyncio.Task[None]:
        self.started.append(active)
        return "running"  # type: ignore[return-value]  # a stand-in: never awaited here

    def _normal(self, pj: PartitionJobs, helds: list[Held], reason: str) -> None:
        self.normal.append(([h.rec.offset for h in helds], reason))


def _held(offset: int, parked_at: float = NOW, deadline: int | None = None) -> Held:
    rec = ParkedRecord(Source("req", 0, offset, 0), None, b"{}", offset, parked_at)
    return Held(rec, Request(id=f"r{offset}", input="x", model="m", deadline=deadline))


def test_a_cut_is_made_when_full_or_when_the_oldest_has_waited() -> None:
    p = _Part(max_per_job=3, max_wait=10)
    for i in range(4):
        p.pj.feed(_held(i))
    p.pj.tick(NOW)
    assert [(a.cut.start, a.cut.end, a.cut.count) for a in p.started] == [(0, 3, 3)]
    p.pj.tick(NOW + 5)
    assert len(p.started) == 1  # the fourth waits
    p.pj.tick(NOW + 10)
    assert [(a.cut.start, a.cut.end) for a in p.started] == [(0, 3), (3, 4)]


def test_commits_stop_at_the_first_unsettled_request() -> None:
    p = _Part()
    assert p.pj.commit_offset() is None
    for i in range(4):
        p.pj.feed(_held(i))
    assert p.pj.commit_offset() == 0
    p.pj.settle(1)
    p.pj.settle(2)
    assert p.pj.commit_offset() == 0
    p.pj.settle(0)
    assert p.pj.commit_offset() == 3
    p.pj.settle(3)
    assert p.pj.commit_offset() == 4


def test_a_near_deadline_leaves_for_the_normal_path_once() -> None:
    p = _Part(fallback=60, max_wait=1000)
    deadline = int((NOW + 100) * 1000)
    p.pj.feed(_held(0, deadline=deadline))
    p.pj.feed(_held(1))
    p.pj.tick(NOW)
    assert p.normal == []
    p.pj.tick(NOW + 41)
    assert p.normal == [([0], "deadline")] and 0 in p.pj.handled
    assert [h.rec.offset for h in p.pj.pending] == [1]
    p.pj.tick(NOW + 50)
    assert len(p.normal) == 1


def test_a_stored_cut_takes_its_records_back_and_a_done_one_is_skipped() -> None:
    done = Cut(0, 0, 2, 2, done=True)
    running = Cut(0, 2, 4, 2)
    p = _Part(stored=[running, done])
    for i in range(5):
        p.pj.feed(_held(i))
    assert p.pj.commit_offset() == 2  # the done cut's records need nothing
    p.pj.tick(NOW)
    assert [a.cut for a in p.started] == [running]
    assert [h.rec.offset for h in p.started[0].held] == [2, 3]
    assert [h.rec.offset for h in p.pj.pending] == [4]
    assert p.pj.finished_cuts(2) == [done] and p.pj.finished_cuts(2) == []


def test_a_cut_waits_until_its_records_are_read() -> None:
    p = _Part(stored=[Cut(0, 0, 3, 3)])
    p.pj.feed(_held(0))
    p.pj.tick(NOW)
    assert p.started == []
    p.pj.position = 3
    p.pj.tick(NOW)
    assert len(p.started) == 1

"""A chaotic upstream: 500s, 429s with Retry-After, calls that hang, connection resets."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from typing import Any

import pytest

from tests.faults.trial import Fleet, Trial, configure, pick, stop_all
from tests.integration.harness import Mock, Stack

CHAOS = {"500": 0.20, "429": 0.10, "hang": 0.05, "reset": 0.05}
RETRY_AFTER = 1.0
MAX_ATTEMPTS = 4


def retry_after_checks(calls: list[dict[str, Any]]) -> tuple[int, list[str]]:
    """After a 429 with Retry-After R at time t, the same prompt's next call to the same
    endpoint comes at t + R or later. Returns (pairs checked, violations)."""
    by_prompt: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for c in calls:
        by_prompt[(c["prompt"], c["endpoint"])].append(c)
    checked, bad = 0, []
    for (prompt, endpoint), seq in by_prompt.items():
        seq.sort(key=lambda c: c["t"])
        for a, b in zip(seq, seq[1:], strict=False):
            if a["status"] == 429:
                checked += 1
                if b["t"] < a["t"] + a["retry_after"]:
                    bad.append(f"{prompt!r} on mock {endpoint}: 429 at {a['t']:.3f} asked "
                               f"{a['retry_after']} s, called again at {b['t']:.3f}")
    return checked, bad


@pytest.mark.timeout(pick(300, 900))
async def test_chaotic_upstream(stack: Stack, mocks: list[Mock], fleet: Fleet) -> None:
    n = pick(1500, 8000)
    await configure(mocks, latency_ms=20, jitter_ms=10, faults=CHAOS, retry_after=RETRY_AFTER,
                    hang_seconds=600)
    for ep in stack.endpoints:
        ep["timeout_seconds"] = 2  # a hanging call ends here
    stack.overrides.update({"retry.max_attempts": MAX_ATTEMPTS, "retry.cooldown_seconds": 1})
    async with Trial("5 chaotic upstream", stack, mocks) as trial:
        workers = [fleet.start(), fleet.start()]
        await asyncio.gather(*(w.ready() for w in workers))
        await trial.send([trial.request(i) for i in range(n)])
        await trial.wait_all(timeout=pick(240, 800))
        calls = await trial.upstream_calls()
        per_prompt = Counter(c["prompt"] for c in calls)
        outcomes: Counter[str] = Counter()
        for sent in trial.sent.values():
            out = sent.outputs[0].value
            made = per_prompt[sent.record.prompt]
            if sent.outputs[0].topic == stack.responses:
                outcomes["answered"] += 1
                assert out["status"] == "ok" and out["attempts"] == made, (out["attempts"], made)
            else:
                outcomes[out["error"]["type"]] += 1
                assert out["error"]["type"] == "exhausted", out["error"]
                assert out["attempts"] == MAX_ATTEMPTS == made == len(out["endpoints"]), out
        faults = Counter(c["fault"] or str(c["status"]) for c in calls)
        assert all(faults[k] > 0 for k in CHAOS), f"a fault never happened: {faults}"
        checked, late = retry_after_checks(calls)
        assert checked > 0, "no retry went back to an endpoint that had answered 429"
        assert not late, f"Retry-After not honoured: {late[:5]}"
        assert all(w.alive() for w in workers)
        await stop_all(workers)
        share = ", ".join(f"{faults[k]:,} {k}" for k in CHAOS)
        await trial.verdict(
            f"{len(calls):,} calls ({share}); {outcomes['answered']:,} answered, "
            f"{outcomes['exhausted']:,} exhausted after {MAX_ATTEMPTS} attempts; Retry-After held "
            f"in {checked:,} retries to the same endpoint")

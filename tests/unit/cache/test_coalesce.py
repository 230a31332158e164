"""The coalescer's state machine on an in-memory lock backend: one compute per key."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from streams.cache.coalesce import Coalescer
from streams.cache.codec import Body
from streams.cache.locks import LockState
from streams.contract import Completion
from streams.dispatch.claim import CLAIM
from streams.errors import ClaimLost

BODY: Body = {"choices": [{"message": {"role": "assistant", "content": "hi"}}]}


class MemoryLocks:
    """A LockBackend in memory: ``state`` says what ``try_lock`` answers."""

    def __init__(self, state: LockState = LockState.ACQUIRED) -> None:
        self.state = state
        self.bodies: dict[str, Body] = {}
        self.held: set[str] = set()
        self.answered = float("-inf")  # what answered_at() says (the loop's clock)
        self.finished: list[tuple[str, str | None, Completion | None, int | None]] = []

    async def try_lock(self, key: str, token: str, ttl_ms: int) -> tuple[LockState, Body | None]:
        if self.state is LockState.ACQUIRED:
            self.held.add(key)
        return self.state, self.bodies.get(key)

    async def peek(self, key: str, token: str = "") -> tuple[Body | None, bool] | None:
        if self.state in (LockState.UNAVAILABLE, LockState.UNANSWERED):
            return None
        return self.bodies.get(key), key in self.held

    def answered_at(self) -> float:
        return self.answered

    async def extend(self, key: str, token: str, ttl_ms: int) -> bool:
        return key in self.held

    async def extend_many(self, held: list[tuple[str, str]], ttl_ms: int) -> list[bool | BaseException]:
        return list(await asyncio.gather(*(self.extend(k, t, ttl_ms) for k, t in held),
                                         return_exceptions=True))

    async def finish(self, key: str, token: str | None, comp: Completion | None,
                     ttl: int | None) -> None:
        self.finished.append((key, token, comp, ttl))
        if comp is not None and ttl is not None:
            self.bodies[key] = comp.body
        self.held.discard(key)


def coalescer(locks: MemoryLocks, events: Counter[str]) -> Coalescer:
    return Coalescer(
        locks, wait_seconds=1.0, lock_seconds=1.0, poll_seconds=0.01,
        on_coalesced=lambda scope: events.update([f"coalesced:{scope}"]),
        on_fallback=lambda reason: events.update([f"fallback:{reason}"]),
    )


def computing(calls: list[int], *, fail_first: bool = False,
              delay: float = 0.01) -> Callable[[], Awaitable[Completion]]:
    async def compute() -> Completion:
        calls.append(1)
        await asyncio.sleep(delay)
        if fail_first and len(calls) == 1:
            raise RuntimeError("leader failed")
        return Completion(model="m", body=BODY, endpoint="a", attempts=1)

    return compute


async def test_concurrent_callers_of_a_key_share_one_compute() -> None:
    locks, events, calls = MemoryLocks(), Counter[str](), list[int]()
    c = coalescer(locks, events)
    out = await asyncio.gather(*(c.run("k", "m", computing(calls), remote=True, ttl=60)
                                 for _ in range(10)))
    assert len(calls) == 1
    assert [o.cached for o in out].count(False) == 1 and events["coalesced:local"] == 9
    assert all(o.cached and o.endpoint is None and o.attempts == 0 for o in out if o.cached)
    ((key, token, comp, ttl),) = locks.finished  # stored and released once, by the leader
    assert key == "k" and token is not None and comp is not None and ttl == 60
    assert not locks.held
    # nothing of the finished run is left in the process: the next caller computes afresh
    again = await c.run("k", "m", computing(calls), remote=False, ttl=None)
    assert len(calls) == 2 and not again.cached


async def test_a_failing_leader_lets_each_waiter_compute_itself() -> None:
    locks, events, calls = MemoryLocks(), Counter[str](), list[int]()
    c = coalescer(locks, events)
    out = await asyncio.gather(
        *(c.run("k", "m", computing(calls, fail_first=True), remote=True, ttl=60)
          for _ in range(3)), return_exceptions=True)
    assert sum(isinstance(o, RuntimeError) for o in out) == 1
    assert sum(isinstance(o, Completion) and not o.cached for o in out) == 2
    assert events["fallback:leader_failed"] == 2 and len(calls) == 3


async def test_an_answer_found_under_the_lock_is_served_without_compute() -> None:
    locks, events, calls = MemoryLocks(), Counter[str](), list[int]()
    locks.bodies["k"] = BODY
    got = await coalescer(locks, events).run("k", "m", computing(calls), remote=True, ttl=60)
    assert got.cached and got.body == BODY and not calls
    assert events["coalesced:remote"] == 1
    assert locks.finished == [("k", locks.finished[0][1], None, None)]  # our lock released


async def test_a_lock_held_elsewhere_is_polled_until_its_answer_appears() -> None:
    locks, events, calls = MemoryLocks(LockState.HELD), Counter[str](), list[int]()
    locks.held.add("k")

    async def other_process() -> None:
        await asyncio.sleep(0.05)
        locks.bodies["k"] = BODY
        locks.held.discard("k")

    task = asyncio.ensure_future(other_process())
    got = await coalescer(locks, events).run("k", "m", computing(calls), remote=True, ttl=60)
    await task
    assert got.cached and not calls and events["coalesced:remote"] == 1


async def test_a_waiter_that_cannot_reach_redis_waits_while_the_lock_could_live() -> None:
    # One timed-out command opens the cache's circuit: every remote waiter's peek then finds
    # Redis unavailable. The holder still computes; computing now would pay its call twice.
    events, calls = Counter[str](), list[int]()
    locks = MemoryLocks(LockState.HELD)
    locks.held.add("k")
    away = True

    class Flaky(MemoryLocks):
        async def peek(self, key: str, token: str = "") -> tuple[Body | None, bool] | None:
            return None if away else await locks.peek(key)

    async def other_process() -> None:
        nonlocal away
        await asyncio.sleep(0.3)  # Redis away for 0.3 s; the holder answers meanwhile
        locks.bodies["k"] = BODY
        locks.held.discard("k")
        away = False

    task = asyncio.ensure_future(other_process())
    c = Coalescer(Flaky(LockState.HELD), wait_seconds=5.0, lock_seconds=2.0, poll_seconds=0.01,
                  on_coalesced=lambda scope: events.update([f"coalesced:{scope}"]))
    got = await c.run("k", "m", computing(calls), remote=True, ttl=60)
    await task
    assert got.cached and not calls and events["coalesced:remote"] == 1


async def test_a_waiter_computes_once_the_lock_would_have_expired_unseen() -> None:
    events, calls = Counter[str](), list[int]()

    class Away(MemoryLocks):
        async def peek(self, key: str, token: str = "") -> tuple[Body | None, bool] | None:
            return None

    c = Coalescer(Away(LockState.HELD), wait_seconds=5.0, lock_seconds=0.2, poll_seconds=0.01,
                  on_fallback=lambda reason: events.update([f"fallback:{reason}"]))
    loop = asyncio.get_running_loop()
    started = loop.time()
    got = await c.run("k", "m", computing(calls), remote=True, ttl=60)
    waited = loop.time() - started
    assert not got.cached and len(calls) == 1 and events["fallback:unavailable"] == 1
    assert 0.2 <= waited < 2.0  # the lock's life, not the whole coalesce_wait_seconds


@pytest.mark.parametrize("remote", [True, False])
async def test_without_redis_or_remote_each_process_computes_alone(remote: bool) -> None:
    locks, events, calls = MemoryLocks(LockState.UNAVAILABLE), Counter[str](), list[int]()
    got = await coalescer(locks, events).run("k", "m", computing(calls), remote=remote, ttl=None)
    assert not got.cached and len(calls) == 1
    assert locks.finished == [("k", None, got, None)]  # no lock was taken; nothing to store


async def test_a_lock_attempt_redis_did_not_answer_is_waited_out_not_computed() -> None:
    # Scale 1-3-1 under load: one slow command opened the new owner's circuit, so its lock
    # attempt for a redelivered record went unanswered; it computed at once, queued behind its
    # in-flight limit, and called the upstream after the old owner (still holding the lock)
    # had published the answer. Redis answered a moment ago: the lock may be held, so wait.
    events, calls = Counter[str](), list[int]()
    locks = MemoryLocks(LockState.UNANSWERED)
    locks.held.add("k")  # the old owner's lock
    locks.answered = asyncio.get_running_loop().time()

    async def old_owner() -> None:
        await asyncio.sleep(0.2)  # the circuit closes; the holder answers a moment later
        locks.state = LockState.HELD
        await asyncio.sleep(0.1)
        locks.bodies["k"] = BODY
        locks.held.discard("k")

    task = asyncio.ensure_future(old_owner())
    c = Coalescer(locks, wait_seconds=5.0, lock_seconds=2.0, poll_seconds=0.01,
                  clock=asyncio.get_running_loop().time,
                  on_coalesced=lambda scope: events.update([f"coalesced:{scope}"]))
    got = await c.run("k", "m", computing(calls), remote=True, ttl=60)
    await task
    assert got.cached and not calls and events["coalesced:remote"] == 1


async def test_an_unanswered_lock_attempt_computes_once_redis_stayed_away_a_lock_life() -> None:
    # A real outage: Redis last answered longer ago than a lock lives, so nobody can still
    # hold one: compute alone at once rather than wait.
    calls: list[int] = []
    locks = MemoryLocks(LockState.UNANSWERED)
    loop = asyncio.get_running_loop()
    locks.answered = loop.time() - 5.0
    c = Coalescer(locks, wait_seconds=5.0, lock_seconds=2.0, poll_seconds=0.01, clock=loop.time)
    started = loop.time()
    got = await c.run("k", "m", computing(calls), remote=True, ttl=60)
    assert not got.cached and len(calls) == 1 and loop.time() - started < 1.0


async def test_waiters_of_a_failed_leader_contend_for_the_lock_again() -> None:
    # The local leader failed; another process took the lock meanwhile and answers. The
    # waiters must not call the upstream beside it: they wait for its answer.
    events, calls = Counter[str](), list[int]()

    class Taken(MemoryLocks):
        other = False  # another process holds the lock

        async def peek(self, key: str, token: str = "") -> tuple[Body | None, bool] | None:
            return self.bodies.get(key), self.other

    locks = Taken()

    async def leader() -> Completion:
        calls.append(1)
        await asyncio.sleep(0.05)
        locks.state, locks.other = LockState.HELD, True  # taken once our lock is released
        raise RuntimeError("leader failed")

    async def other_process() -> None:
        await asyncio.sleep(0.2)
        locks.bodies["k"] = BODY
        locks.other = False

    task = asyncio.ensure_future(other_process())
    c = coalescer(locks, events)
    first = asyncio.ensure_future(c.run("k", "m", leader, remote=True, ttl=60))
    await asyncio.sleep(0)
    waiters = [c.run("k", "m", computing(calls), remote=True, ttl=60) for _ in range(3)]
    got = await asyncio.gather(*waiters)
    with pytest.raises(RuntimeError):
        await first
    await task
    assert len(calls) == 1 and all(g.cached for g in got)
    assert events["fallback:leader_failed"] == 3 and events["coalesced:remote"] == 3


async def test_a_holder_whose_claim_is_lost_before_its_call_waits_for_the_new_holder() -> None:
    # The dispatcher found the lock gone to another worker right before the upstream call
    # (ClaimLost): no call; the new holder's answer is served.
    events, calls = Counter[str](), list[int]()
    locks = MemoryLocks()
    looked: list[bool] = []

    async def compute() -> Completion:
        claim = CLAIM.get()
        assert claim is not None  # set by the coalescer for its own dispatch
        locks.state = LockState.HELD  # our lock expired and another worker took it
        looked.append(await claim())
        raise ClaimLost("taken")

    async def new_holder() -> None:
        await asyncio.sleep(0.1)
        locks.bodies["k"] = BODY
        locks.held.discard("k")

    class Taken(MemoryLocks):
        async def extend(self, key: str, token: str, ttl_ms: int) -> bool:
            return False

    locks = Taken()
    locks.held.add("k")
    task = asyncio.ensure_future(new_holder())
    got = await coalescer(locks, events).run("k", "m", compute, remote=True, ttl=60)
    await task
    assert got.cached and not calls and looked == [False] and events["coalesced:remote"] == 1
    assert CLAIM.get() is None  # not left set for the caller

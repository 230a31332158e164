"""Request coalescing: identical requests in flight at once cause one upstream call.

Two levels. In one process, the first caller of a key is the leader and the others await
its future (no Redis at all). Across processes, each process's leader takes a Redis lock
(``SET NX PX``, kept alive by one heartbeat for all the locks a process holds); a leader
that finds the lock held polls for the answer instead of computing. Failure never spreads: if
the leader's compute fails, its waiters contend for the lock again (one computes, with its
own retries); if the lock holder dies, its lock expires and a waiter takes over.

The upstream is called only under the lock, or once Redis has not answered for as long as a
holder's lock could live (an outage: each process then computes alone). A lock attempt or a
peek that Redis did not answer (its circuit open after one slow command, a timeout on a busy
machine) is waited out, never taken as "nobody holds it": a worker that computed then would
call the upstream while the lock's holder (say, the previous owner of a rebalanced partition)
still computes, and its call, queued behind its in-flight limit, could land after the holder's
answer was published. And since a holder's call may come seconds after it took the lock
(waiting for an in-flight slot or a rate limit), the dispatcher looks at the lock once more
right before each attempt (``dispatch/claim.py``: the look renews it); one that went to another
worker meanwhile makes no call, and the holder waits for that worker's answer instead.
Waiting is bounded by ``cache.coalesce_wait_seconds``.

The Redis side is behind the small ``LockBackend`` protocol (``locks.py``),
so this module holds only the state machine.

Usage::

    coalescer = Coalescer(backend, wait_seconds=120, lock_seconds=10, poll_seconds=0.05)
    comp = await coalescer.run(key, "gpt-4o-mini", compute, remote=True, ttl=3600)
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from functools import partial

from streams.cache.codec import Body, cached_completion
from streams.cache.locks import LockBackend, LockState
from streams.contract import Completion
from streams.dispatch.claim import CLAIM
from streams.errors import ClaimLost

log = logging.getLogger("streams.coalesce")

Compute = Callable[[], Awaitable[Completion]]  # one upstream call: the dispatch of a request

class _Outcome(enum.Enum):
    GONE = "gone"  # the lock vanished without an answer: its holder failed or died
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"


class Coalescer:
    """Runs ``compute`` once per key among concurrent callers. Bodies are shared: read-only."""

    def __init__(
        self,
        backend: LockBackend,
        *,
        wait_seconds: float,
        lock_seconds: float,
        poll_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        on_coalesced: Callable[[str], None] = lambda scope: None,
        on_fallback: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._backend = backend
        self._wait = wait_seconds
        self._lock_ms = max(int(lock_seconds * 1000), 1)
        self._poll = poll_seconds
        self._clock = clock
        self._on_coalesced = on_coalesced
        self._on_fallback = on_fallback
        # None as a result means "the leader failed": waiters then compute themselves.
        self._inflight: dict[str, asyncio.Future[Completion | None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        # The locks held while their compute runs, renewed together by one heartbeat task:
        # a task, a timer and a context per held lock cost ~10 objects each, and read-ahead
        # keeps tens of thousands of leaders waiting for an in-flight slot.
        self._held: set[tuple[str, str]] = set()
        self._beater: asyncio.Task[None] | None = None

    async def run(self, key: str, model: str, compute: Compute, *, remote: bool, ttl: int | None
                  ) -> Completion:
        """One answer for all concurrent callers of ``key``; the leader's is stored for ``ttl``.

        ``remote=False`` coalesces within this process only (e.g. for no_store requests,
        whose answer other processes could never read).
        """
        fut = self._inflight.get(key)
        if fut is not None:
            return await self._follow(fut, key, model, compute, remote=remote, ttl=ttl)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            comp = await self._lead(key, model, compute, remote=remote, ttl=ttl)
        except BaseException:
            fut.set_result(None)
            raise
        else:
            fut.set_result(comp)
        finally:
            if self._inflight.get(key) is fut:
                del self._inflight[key]
        return comp

    async def _follow(
        self,
        fut: asyncio.Future[Completion | None],
        key: str,
        model: str,
        compute: Callable[[], Awaitable[Completion]],
        *,
        remote: bool,
        ttl: int | None,
    ) -> Completion:
        try:
            # shield: a waiter that gives up (or is cancelled) must not cancel the leader's result
            comp = await asyncio.wait_for(asyncio.shield(fut), self._wait)
        except TimeoutError:
            self._on_fallback("timeout")
            return await self._compute(key, None, compute, ttl)
        if comp is None:
            # The lock is free again, or another process took it: contend for it like a leader
            self._on_fallback("leader_failed")
            return await self._lead(key, model, compute, remote=remote, ttl=ttl)
        self._on_coalesced("local")
        return cached_completion(comp.body, model)

    async def _lead(self, key: str, model: str, compute: Compute, *, remote: bool, ttl: int | None
                    ) -> Completion:
        if not remote:
            return await self._compute(key, None, compute, ttl)
        deadline = self._clock() + self._wait
        token = secrets.token_hex(8)
        while True:
            state, body = await self._backend.try_lock(key, token, self._lock_ms)
            if body is not None:
                # Answered between our cache lookup and now (double-checked under the lock).
                if state is LockState.ACQUIRED:
                    await self._backend.finish(key, token, None, None)
                self._on_coalesced("remote")
                return cached_completion(body, model)
            if state is LockState.ACQUIRED:
                try:
                    return await self._compute(key, token, compute, ttl)
                except ClaimLost:  # the lock went (to another worker?) before our call
                    # A new token: the release of the lost one, under way in the background,
                    # must not release the lock we take next.
                    token = secrets.token_hex(8)
                    if self._clock() < deadline:
                        continue
                    self._on_fallback(_Outcome.TIMEOUT.value)
                    return await self._compute(key, None, compute, ttl)
            if state is LockState.UNAVAILABLE:
                return await self._compute(key, None, compute, ttl)
            # HELD: seen held now. UNANSWERED: it may be held, as far as Redis last told us.
            seen = self._clock() if state is LockState.HELD else self._backend.answered_at()
            outcome = await self._wait_remote(key, token, deadline, seen)
            if isinstance(outcome, dict):
                self._on_coalesced("remote")
                return cached_completion(outcome, model)
            if outcome is _Outcome.GONE and self._clock() < deadline:
                continue  # the holder failed or died: try to become the leader ourselves
            self._on_fallback(outcome.value)
            return await self._compute(key, None, compute, ttl)

    async def _wait_remote(self, key: str, token: str, deadline: float, held_at: float
                           ) -> Body | _Outcome:
        # Start polling fast (mock or cached upstreams answer in ms), back off to the
        # configured interval; peeks from all waiters of a tick share one MGET. ``held_at``:
        # when the lock was last seen held (or could have been: Redis's last answer).
        delay = min(0.005, self._poll)
        while True:
            left = deadline - self._clock()
            if left <= 0:
                return _Outcome.TIMEOUT
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, self._poll)
            seen = await self._backend.peek(key, token)
            if seen is None:
                # Redis did not answer (one timed-out command opens the cache's circuit for
                # every waiter): the holder is alive until its lock would have expired, so
                # computing now would pay its call twice. Keep waiting until then.
                if self._clock() - held_at < self._lock_ms / 1000:
                    continue
                return _Outcome.UNAVAILABLE
            held_at = self._clock()
            body, held = seen
            if body is not None:
                return body
            if not held:  # (or held by our own attempt that Redis did not answer)
                return _Outcome.GONE

    async def _compute(
        self,
        key: str,
        token: str | None,
        compute: Callable[[], Awaitable[Completion]],
        ttl: int | None,
    ) -> Completion:
        if token is None:
            return await self._finish_unlocked(key, compute, ttl)
        held = (key, token)
        self._held.add(held)
        if self._beater is None:
            self._beater = asyncio.get_running_loop().create_task(self._heartbeat())
        claim = CLAIM.set(partial(self._backend.extend, key, token, self._lock_ms))
        try:
            comp = await compute()
        except BaseException:
            # Release now so remote waiters take over at once rather than at expiry; in
            # the background, because we may be being cancelled.
            self._spawn(self._backend.finish(key, token, None, None))
            raise
        finally:
            self._held.discard(held)
            CLAIM.reset(claim)
        # Stored before the lock is released, so a poller sees either the lock or the answer.
        await self._backend.finish(key, token, comp, ttl)
        return comp

    async def _finish_unlocked(self, key: str, compute: Compute, ttl: int | None) -> Completion:
        comp = await compute()
        await self._backend.finish(key, None, comp, ttl)
        return comp

    async def _heartbeat(self) -> None:
        """Renew every held lock each third of its life, in one batch (the backend's), until
        none is held. A slow but alive holder keeps its lock for as long as its compute runs;
        a dead one's lock expires within lock_seconds. A lock whose renewal is refused (it
        expired, or went to another worker) is renewed no more: the claim check before the
        holder's next attempt finds that out (``dispatch/claim.py``)."""
        interval = self._lock_ms / 3000
        try:
            while self._held:
                await asyncio.sleep(interval)
                items = list(self._held)
                renewed = await self._backend.extend_many(items, self._lock_ms)
                for item, ok in zip(items, renewed, strict=True):
                    if isinstance(ok, BaseException):
                        if not isinstance(ok, Exception):
                            raise ok
                        log.warning("lock renewal failed: %s", ok)
                    elif not ok:
                        self._held.discard(item)
        finally:
            self._beater = None

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        """Stop renewing locks (they expire by themselves) and wait for background releases."""
        if self._beater is not None:
            self._beater.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


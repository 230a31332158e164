"""Coalescing locks: the small interface the coalescer talks to, and its Redis backend.

A lock is ``SET NX PX`` on ``{prefix}:l:{key}``, released and extended only by its holder's
token (compare-and-delete / compare-and-extend in Lua). Lock attempts and finishes of one
loop tick share one pipeline each: a batch of misses costs two round trips, not two per
request; the renewals of one tick share one pipeline too (thousands of leaders renew every
few seconds). A finish (the answer stored, the lock released) is a ``force`` call, with a lock
or without one (tried while the cache's circuit is open, and again after an outage error): an
answer missing from Redis, or a lock left held without it, makes another worker's redelivery
of the same record call the upstream again. Lock attempts and peeks follow the circuit: under
overload, trying them anyway only adds to what times out; an attempt Redis did not answer is
``UNANSWERED`` (the lock may be held elsewhere: the coalescer waits, it does not compute). A
renewal is a ``force`` call too: a holder whose renewals are skipped for a lock's life loses
its lock while it still computes, and another worker then pays the same call.

On a single Redis server each batch is one Lua script (``_TRY_MANY``, ``_EXTEND_MANY``,
``_FINISH_MANY``): the same commands in the same order per item, but one command for redis-py
to pack and parse instead of two or three per item (that client's cost per command was most
of what a lock cost a worker: 6 commands per request for the lock of one id). A cluster's
keys of one batch live in many slots, so there (and for a batch whose script fails with a
command error, e.g. a key of the wrong type) the items go as a pipeline of single commands.

Usage::

    locks = RedisLocks(store, max_items=256)
    state, body = await locks.try_lock(key, token, ttl_ms=10_000)
"""

from __future__ import annotations

import asyncio
import enum
from typing import Any, Protocol, cast

from streams.cache.batching import Batcher
from streams.cache.codec import Body, decode_body
from streams.cache.store import RedisStore
from streams.contract import Completion
from streams.redis_guard import DOWN

# Compare-and-delete / compare-and-extend: only the holder's token may touch its lock.
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)
_EXTEND = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)

# The batch scripts: per item exactly the pipeline's commands, in the pipeline's order.
# KEYS: lock, answer per item; ARGV: token, ttl_ms per item -> acquired (1/0), answer, holder
_TRY_MANY = """
local out = {}
for i = 1, #KEYS / 2 do
  local got = redis.call('set', KEYS[2*i-1], ARGV[2*i-1], 'NX', 'PX', ARGV[2*i])
  out[3*i-2] = got and 1 or 0
  out[3*i-1] = redis.call('get', KEYS[2*i])
  out[3*i] = redis.call('get', KEYS[2*i-1])
end
return out
"""
# KEYS: lock per item; ARGV: token, ttl_ms per item -> 1 renewed / 0 not ours, per item
_EXTEND_MANY = """
local out = {}
for i = 1, #KEYS do
  out[i] = 0
  if redis.call('get', KEYS[i]) == ARGV[2*i-1] then
    out[i] = redis.call('pexpire', KEYS[i], ARGV[2*i])
  end
end
return out
"""
# KEYS: answer, lock per item; ARGV: token, ttl (s), value ('' = none) per item -> stored
_FINISH_MANY = """
local stored = 0
for i = 1, #KEYS / 2 do
  if ARGV[3*i] ~= '' then
    redis.call('set', KEYS[2*i-1], ARGV[3*i], 'EX', ARGV[3*i-1])
    stored = stored + 1
  end
  if redis.call('get', KEYS[2*i]) == ARGV[3*i-2] then redis.call('del', KEYS[2*i]) end
end
return stored
"""

LockItem = tuple[str, str, int]  # key, token, ttl_ms (a lock attempt or a renewal)
FinishItem = tuple[str, str, bytes | None, int]  # key, token, value to store, ttl


class LockState(enum.Enum):
    ACQUIRED = "acquired"
    HELD = "held"  # by another process
    # Redis did not answer (its circuit is open, or the attempt timed out): the lock may be
    # held elsewhere, or even taken by this very attempt
    UNANSWERED = "unanswered"
    UNAVAILABLE = "unavailable"  # Redis refused the lock command: proceed as if alone


class LockBackend(Protocol):
    """What the coalescer needs from Redis. Implementations never raise Redis errors."""

    async def try_lock(self, key: str, token: str, ttl_ms: int) -> tuple[LockState, Body | None]:
        """Take the lock if free (or if it already holds ``token``: an earlier attempt Redis
        did not answer may have set it); also return the cached answer if one is there."""
        ...

    async def peek(self, key: str, token: str = "") -> tuple[Body | None, bool] | None:
        """(cached answer or None, lock held by another token than ``token``), or None if
        Redis is unavailable."""
        ...

    async def extend(self, key: str, token: str, ttl_ms: int) -> bool:
        """Push the lock's expiry out; False once the lock is no longer ours."""
        ...

    async def extend_many(self, held: list[tuple[str, str]], ttl_ms: int) -> list[bool | BaseException]:
        """``extend`` for each (key, token) at once (the heartbeat's): an item's failure is its
        exception in the list, not the call's."""
        ...

    async def finish(
        self, key: str, token: str | None, comp: Completion | None, ttl: int | None
    ) -> None:
        """Store ``comp`` for ``ttl`` seconds (if both given), then release our lock."""
        ...

    def answered_at(self) -> float:
        """When Redis last answered this process (the coalescer's clock); -inf: never."""
        ...


class RedisLocks:
    """The coalescer's Redis side (a ``LockBackend``) on the cache's ``RedisStore``."""

    def __init__(self, store: RedisStore, max_items: int) -> None:
        self._store = store
        self._locks: Batcher[LockItem, tuple[LockState, Body | None]] = Batcher(
            self._try_locks, max_items, store.tasks
        )
        self._finishes: Batcher[FinishItem, None] = Batcher(self._finish_many, max_items, store.tasks)
        # renewals are not the store's pending work: a stop does not wait for them
        self._renewals: set[asyncio.Task[None]] = set()
        self._extends: Batcher[LockItem, bool] = Batcher(self._extend_many, max_items, self._renewals)

    def flush(self) -> None:
        self._locks.flush()
        self._finishes.flush()

    def stop_renewals(self) -> None:
        """Drop the renewals under way (at a stop: the locks then expire by themselves)."""
        for task in self._renewals:
            task.cancel()

    async def try_lock(self, key: str, token: str, ttl_ms: int) -> tuple[LockState, Body | None]:
        if not self._store.guard.available():
            return LockState.UNANSWERED, None
        return await self._locks.submit((key, token, ttl_ms))

    def answered_at(self) -> float:
        return self._store.guard.answered_at

    async def _try_locks(self, items: list[LockItem]) -> list[tuple[LockState, Body | None]]:
        s = self._store

        async def go() -> list[Any]:
            if s.scripted:
                keys: list[Any] = []
                args: list[Any] = []
                for key, token, ttl_ms in items:
                    keys += (s.lkey(key), s.ckey(key))
                    args += (token, ttl_ms)
                got = await self._store.run_script(_TRY_MANY, keys, args)
                if got is not None:
                    return cast(list[Any], got)
            pipe = s.redis.pipeline(transaction=False)
            for key, token, ttl_ms in items:
                pipe.set(s.lkey(key), token, nx=True, px=ttl_ms)
                pipe.get(s.ckey(key))
                pipe.get(s.lkey(key))
            return await pipe.execute(raise_on_error=False)

        res = await s.call("lock", go)
        if res is DOWN:
            return [(LockState.UNANSWERED, None)] * len(items)
        ok = s.guard.replies("lock", res)
        out: list[tuple[LockState, Body | None]] = []
        again: list[int] = []  # set by an earlier attempt of ours: its expiry is renewed first
        for i, item in enumerate(items):
            acquired, raw, holder = res[3 * i:3 * i + 3]
            body = decode_body(raw) if isinstance(raw, bytes) else None
            if not ok[3 * i]:  # that lock command failed: proceed as if alone
                out.append((LockState.UNAVAILABLE, body))
                continue
            if not acquired and holder == item[1].encode():
                again.append(i)
            out.append(((LockState.ACQUIRED if acquired else LockState.HELD), body))
        if again:
            renewed = await self._extend_many([items[i] for i in again])
            for i, mine in zip(again, renewed, strict=True):
                # still ours (or Redis did not say: the next renewal or the claim check will)
                out[i] = ((LockState.ACQUIRED if mine else LockState.HELD), out[i][1])
        return out

    async def peek(self, key: str, token: str = "") -> tuple[Body | None, bool] | None:
        s = self._store
        raw, lock = await s.read_many([s.ckey(key), s.lkey(key)])
        if raw is DOWN or lock is DOWN:
            return None
        held = lock is not None and lock != token.encode()
        return (decode_body(raw) if raw is not None else None), held

    async def extend(self, key: str, token: str, ttl_ms: int) -> bool:
        return await self._extends.submit((key, token, ttl_ms))

    async def extend_many(self, held: list[tuple[str, str]], ttl_ms: int) -> list[bool | BaseException]:
        # Futures of the batcher, not a task per lock: a worker reading ahead holds a lock per
        # queued miss, thousands of them, all renewed in each beat.
        futs = [self._extends.submit((key, token, ttl_ms)) for key, token in held]
        return await asyncio.gather(*futs, return_exceptions=True)

    async def _extend_many(self, items: list[LockItem]) -> list[bool]:
        s = self._store

        async def go() -> list[Any]:
            if s.scripted:
                args: list[Any] = []
                for _, token, ttl_ms in items:
                    args += (token, ttl_ms)
                got = await self._store.run_script(_EXTEND_MANY, [s.lkey(key) for key, _, _ in items], args)
                if got is not None:
                    return cast(list[Any], got)
            pipe = s.redis.pipeline(transaction=False)
            for key, token, ttl_ms in items:
                pipe.eval(_EXTEND, 1, s.lkey(key), token, ttl_ms)
            return await pipe.execute(raise_on_error=False)

        res = await s.call("lock", go, force=True)  # tried through the circuit: see the module doc
        if res is DOWN:
            return [True] * len(items)  # keep beating, Redis may come back
        ok = s.guard.replies("lock", res)
        return [not done or bool(r) for r, done in zip(res, ok, strict=True)]

    async def finish(
        self, key: str, token: str | None, comp: Completion | None, ttl: int | None
    ) -> None:
        s = self._store
        value = None
        if comp is not None and ttl is not None and not comp.cached:
            value = s.encode(comp.body)
        if token is None:
            if value is not None:
                # computed without a lock: the answer is all that stops another worker's redelivery
                await s.write(s.ckey(key), value, ttl or 1, "cache", force=True)
            return
        await self._finishes.submit((key, token, value, ttl or 1))

    async def _finish_many(self, items: list[FinishItem]) -> list[None]:
        s = self._store

        async def go() -> list[Any] | int:
            if s.scripted:
                keys: list[Any] = []
                args: list[Any] = []
                for key, token, value, ttl in items:
                    keys += (s.ckey(key), s.lkey(key))
                    args += (token, ttl, b"" if value is None else value)
                got = await self._store.run_script(_FINISH_MANY, keys, args)
                if got is not None:
                    return cast(int, got)  # the count of answers stored
            pipe = s.redis.pipeline(transaction=False)
            for key, token, value, ttl in items:
                if value is not None:
                    pipe.set(s.ckey(key), value, ex=ttl)
                pipe.eval(_RELEASE, 1, s.lkey(key), token)
            return await pipe.execute(raise_on_error=False)

        res = await s.call("lock", go, force=True)
        stored = 0 if res is DOWN else res if isinstance(res, int) else self._stored(items, res)
        if stored:
            s.metrics.writes.labels("cache").inc(stored)
        return [None] * len(items)

    def _stored(self, items: list[FinishItem], replies: list[Any]) -> int:
        """How many answers a finish pipeline stored (its failed commands noted)."""
        ok = iter(self._store.guard.replies("lock", replies))
        stored = 0
        for _, _, value, _ in items:
            if value is not None:
                stored += next(ok)
            next(ok)  # the release
        return stored

"""A tiny in-memory stand-in for redis.asyncio.Redis: just what streams.cache uses.

It counts round trips per command and can be told to fail, to hang (``hang``: the next n
round trips never answer, so the caller's timeout ends them, as under a lagging event loop) or
to lose replies (``lose``: the next n round trips are done, their replies never arrive), so
batching and outage handling are testable without a server. Like Redis, a SET whose expiry is out of range fails
that command alone (``ResponseError``); a pipeline raises the first such error unless run
with ``raise_on_error=False``, which returns it in its place.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from streams.cache.locks import _EXTEND, _EXTEND_MANY, _FINISH_MANY, _RELEASE, _TRY_MANY
from streams.cache.store import _SET_MANY

# Redis refuses an EX whose milliseconds overflow a signed 64-bit integer.
MAX_EX = (2**63 - 1) // 1000


def _b(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


class FakeRedis:
    def __init__(self) -> None:
        self.data: dict[bytes, tuple[bytes, float | None]] = {}
        self.round_trips: Counter[str] = Counter()
        self.fail = False
        self.error: Exception | None = None  # raised instead of a connection error
        self.delay = 0.0
        self.hang = 0
        self.lose = 0

    def batches(self) -> int:
        """Round trips of batches: a pipeline each, or a script each (``cache/store.py``'s and
        ``cache/locks.py``'s batches on a single server)."""
        return self.round_trips["eval"] + self.round_trips["pipeline"]

    def get_connection_kwargs(self) -> dict[str, Any]:
        return {}

    async def _trip(self, name: str) -> None:
        self.round_trips[name] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise self.error or RedisConnectionError(
                "Error 111 connecting to fake. Connection refused."
            )
        if self.hang:
            self.hang -= 1
            await asyncio.sleep(3600)

    async def _reply(self) -> None:
        if self.lose:
            self.lose -= 1
            await asyncio.sleep(3600)

    def _get(self, key: Any) -> bytes | None:
        item = self.data.get(_b(key))
        if item is None:
            return None
        value, expires = item
        if expires is not None and time.monotonic() >= expires:
            del self.data[_b(key)]
            return None
        return value

    def ttl(self, key: str) -> float | None:
        item = self.data.get(key.encode())
        return None if item is None or item[1] is None else item[1] - time.monotonic()

    def _set(self, key: Any, value: Any, ex: int | None = None, px: int | None = None,
             nx: bool = False) -> bool | None:
        if ex is not None and not 0 < ex <= MAX_EX or px is not None and not 0 < px < 2**63:
            raise ResponseError("invalid expire time in 'set' command")
        if nx and self._get(key) is not None:
            return None
        ttl = ex if ex is not None else (px / 1000 if px is not None else None)
        self.data[_b(key)] = (_b(value), None if ttl is None else time.monotonic() + ttl)
        return True

    def _eval(self, script: str, numkeys: int, *args: Any) -> Any:
        keys, argv = args[:numkeys], args[numkeys:]
        if script == _TRY_MANY:  # the batch scripts, command for command (``cache/locks.py``)
            out: list[Any] = []
            for i in range(numkeys // 2):
                got = self._set(keys[2 * i], argv[2 * i], px=int(argv[2 * i + 1]), nx=True)
                out += [1 if got else 0, self._get(keys[2 * i + 1]), self._get(keys[2 * i])]
            return out
        if script == _SET_MANY:
            for i, key in enumerate(keys):
                self._set(key, argv[2 * i], ex=int(argv[2 * i + 1]))
            return len(keys)
        if script == _EXTEND_MANY:
            return [self._eval(_EXTEND, 1, k, argv[2 * i], argv[2 * i + 1])
                    for i, k in enumerate(keys)]
        if script == _FINISH_MANY:
            stored = 0
            for i in range(numkeys // 2):
                token, ttl, value = argv[3 * i:3 * i + 3]
                if _b(value):
                    self._set(keys[2 * i], value, ex=int(ttl))
                    stored += 1
                self._eval(_RELEASE, 1, keys[2 * i + 1], token)
            return stored
        key, token = args[0], _b(args[1])
        if self._get(key) != token:
            return 0
        if script == _RELEASE:
            del self.data[_b(key)]
            return 1
        if script == _EXTEND:
            self.data[_b(key)] = (token, time.monotonic() + int(args[2]) / 1000)
            return 1
        raise AssertionError("unknown script")

    async def mget(self, keys: list[Any]) -> list[bytes | None]:
        await self._trip("mget")
        got = [self._get(k) for k in keys]
        await self._reply()
        return got

    async def get(self, key: Any) -> bytes | None:
        await self._trip("get")
        return self._get(key)

    async def set(self, key: Any, value: Any, **kw: Any) -> bool | None:
        await self._trip("set")
        return self._set(key, value, **kw)

    async def eval(self, script: str, numkeys: int, *args: Any) -> Any:
        await self._trip("eval")
        return self._eval(script, numkeys, *args)

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)


class FakePipeline:
    def __init__(self, redis: FakeRedis) -> None:
        self._r = redis
        self._ops: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def set(self, *a: Any, **kw: Any) -> FakePipeline:
        self._ops.append(("set", a, kw))
        return self

    def get(self, *a: Any) -> FakePipeline:
        self._ops.append(("get", a, {}))
        return self

    def eval(self, *a: Any) -> FakePipeline:
        self._ops.append(("eval", a, {}))
        return self

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        await self._r._trip("pipeline")
        out: list[Any] = []
        for name, a, kw in self._ops:
            fn: Any = {"set": self._r._set, "get": self._r._get, "eval": self._r._eval}[name]
            try:
                out.append(fn(*a, **kw))
            except ResponseError as exc:
                out.append(exc)
        await self._r._reply()
        errors = [r for r in out if isinstance(r, ResponseError)]
        if errors and raise_on_error:
            raise errors[0]
        return out

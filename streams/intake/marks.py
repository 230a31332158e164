"""Offsets whose output the broker acknowledged, marked in Redis at once, for the next owner.

A commit's metadata names the offsets finished above the committed one (``finished.py``), but
only those finished before that commit. Whatever is published after the last commit is
answered again by the next owner after a crash: the SIGKILL loop of the fault suite killed a
worker right after a rebalance, while it published what came back during it, and nearly every
duplicate was an output published 0.03 to 0.16 s before the kill. So each published offset is
also marked here, ``delay`` after its acknowledgement (later while the previous write is
still under way: one write at a time), and an assignment reads the
marks above the committed offset together with the commit's metadata (``Ledger.read_all``).

Trust: a mark is written only once the output is acknowledged, and it is read only under the
token of the partition's history, which every commit of ours carries in its metadata. A
commit written by anything else (an offset reset, a consumer without our metadata) carries
none; its partition gets a new token, so marks of an older history are never read back. Only
positive evidence skips a record: marks that are lost, late or unreadable leave it redone.

Keys: ``{prefix}:p:{token}:{topic}:{partition}``, a sorted set of runs ``"start-end"``
(half-open) scored by their end. A write drops the runs below the committed offset (settled)
when that offset moved since the key's last trim, and sets the key's TTL (``ttl``) when it was
not set in the last hour; after a failed write, every key gets both again. No hash tag: one
command touches one key (Redis Cluster).

Usage::

    marks = PublishedMarks(redis, "llmstreams")
    marks.add(tp, token, offset, committed)          # on the loop; written about ``delay`` later
    got = await marks.read({tp: (token, committed)})  # tp -> Runs above committed
    await marks.close()                               # writes what is left
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from typing import Any

from streams.intake.finished import MAX_SPAN, Runs
from streams.logs import LogThrottle
from streams.redis_guard import REDIS_ERRORS

log = logging.getLogger("streams.worker")

_RUN = re.compile(rb"(\d{1,19})-(\d{1,19})")
MAX_READ = 100_000  # runs read per partition at an assignment (more: the rest is redone)
REFRESH_SECONDS = 3600.0  # a key's TTL is set again after this long (it is days)
MAX_KEYS = 65_536  # keys whose trim and TTL are remembered (more: forgotten, sent again)


class PublishedMarks:
    """Marks published offsets per partition (batched every ``delay`` seconds) and reads them
    back at an assignment (at most ``read_seconds``)."""

    def __init__(self, redis: Any, prefix: str, *, delay: float = 0.02,
                 ttl: int = 7 * 86_400, read_seconds: float = 2.0) -> None:
        self._redis = redis
        self._prefix = prefix
        self._delay = delay
        self._ttl = ttl
        self._read_seconds = read_seconds
        self._pending: dict[str, tuple[list[int], int]] = {}  # key -> (offsets, floor)
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None
        self._failed = LogThrottle(30.0, time.monotonic)
        self._refresh = min(REFRESH_SECONDS, ttl / 2)
        self._upkept: dict[str, tuple[int, float]] = {}  # key -> (trimmed below, TTL set at)

    def key(self, tp: Any, token: str) -> str:
        return f"{self._prefix}:p:{token}:{tp.topic}:{tp.partition}"

    def add(self, tp: Any, token: str, offset: int, floor: int) -> None:
        """``offset`` of ``tp`` is published; ``floor``: its committed offset (settled below)."""
        key = self.key(tp, token)
        entry = self._pending.get(key)
        if entry is None:
            self._pending[key] = ([offset], floor)
        else:
            entry[0].append(offset)
            if floor != entry[1]:
                self._pending[key] = (entry[0], max(floor, entry[1]))
        if self._timer is None and self._writing is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self._start)

    def _start(self) -> None:
        self._timer = None
        if self._pending and self._writing is None:
            self._writing = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        try:
            while self._pending:  # what was added during a write goes in the next one
                batch, self._pending = self._pending, {}
                await self._write(batch)
                if self._pending:
                    await asyncio.sleep(self._delay)
        finally:
            self._writing = None

    async def _write(self, batch: dict[str, tuple[list[int], int]]) -> None:
        """One pipeline: per key a ZADD of the runs, a trim when its commit moved since the last
        trim, and its TTL when not set for ``refresh`` seconds (a write sends 1 to 3 commands
        per key, most often 1)."""
        pipe = self._redis.pipeline(transaction=False)
        now = time.monotonic()
        upkeep: list[tuple[str, tuple[int, float]]] = []
        for key, (offsets, floor) in batch.items():
            pipe.zadd(key, {f"{s}-{e}": e for s, e in Runs.of(offsets).runs()})
            trimmed, expired = self._upkept.get(key, (-1, -math.inf))
            if floor > trimmed:  # the commit moved: drop the runs it settled
                pipe.zremrangebyscore(key, "-inf", floor)
                trimmed = floor
            if now - expired >= self._refresh:
                pipe.expire(key, self._ttl)
                expired = now
            upkeep.append((key, (trimmed, expired)))
        try:
            replies = await pipe.execute(raise_on_error=False)
        except REDIS_ERRORS as exc:
            replies = [exc]
        if not (errors := [r for r in replies if isinstance(r, BaseException)]):
            if len(self._upkept) > MAX_KEYS:
                self._upkept.clear()
            self._upkept.update(upkeep)
            return
        # Redis failed or was replaced (a restart loses keys with their TTLs): every key gets
        # its trim and TTL again at its next write
        self._upkept.clear()
        if count := self._failed.due():
            log.warning("could not mark published offsets in redis (%s): those records are"
                        " answered again after a crash (%d failed writes since last report)",
                        type(errors[0]).__name__, count)

    async def read(self, want: dict[Any, tuple[str, int]]) -> dict[Any, Runs]:
        """Per partition, the offsets marked at or above its committed offset, under its
        token; partitions with none (or when Redis does not answer in time) are left out."""
        keys = [(tp, self.key(tp, token), floor) for tp, (token, floor) in want.items()]
        try:
            async with asyncio.timeout(self._read_seconds):
                pipe = self._redis.pipeline(transaction=False)
                for _, key, floor in keys:
                    pipe.zrangebyscore(key, f"({floor}", "+inf", start=0, num=MAX_READ)
                replies = await pipe.execute(raise_on_error=False)
        except (*REDIS_ERRORS, TimeoutError) as exc:
            log.warning("could not read the published marks from redis (%s): records published"
                        " after the last commit are answered again", type(exc).__name__)
            return {}
        out: dict[Any, Runs] = {}
        for (tp, _, floor), members in zip(keys, replies, strict=True):
            if isinstance(members, BaseException) or not members:
                continue
            if runs := _parse(members, floor):
                out[tp] = runs
        return out

    async def close(self) -> None:
        """Write what is pending (a stop: the final commit names it too)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is not None:
            await asyncio.shield(self._writing)
        if self._pending:
            batch, self._pending = self._pending, {}
            await self._write(batch)


def _parse(members: list[Any], floor: int) -> Runs:
    """The runs of ``members`` at or above ``floor``; malformed members are ignored."""
    runs: list[tuple[int, int]] = []
    for m in members:
        match = _RUN.fullmatch(m if isinstance(m, bytes) else str(m).encode())
        if match is None:
            continue
        start, end = int(match[1]), int(match[2])
        if start < end and end - start <= MAX_SPAN:
            runs.append((start, end))
    return Runs(sorted(runs)).from_(floor)

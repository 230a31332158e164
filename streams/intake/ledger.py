"""Per partition, the offsets known finished above the committed one (``Ledger``): what the
commit read at an assignment names (its metadata, ``finished.py``, and the marks in Redis
under its token, ``marks.py``), and what finished here; it writes each commit's metadata.

Usage::

    ledger = Ledger(tracker, max_bytes=4096, marks=PublishedMarks(redis, prefix))
    await ledger.read_all({tp: (committed, metadata)})  # after an assignment's seek
    if ledger.skips(tp, offset): ...                     # published already: do not redo it
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from streams.intake.acks import AckTracker
from streams.intake.finished import Runs, decode, encode, new_token, token_of

if TYPE_CHECKING:
    from streams.intake.marks import PublishedMarks

log = logging.getLogger("streams.worker")


class CommitMetadata(Protocol):
    """The metadata each commit carries, and what is read back at an assignment
    (``Ledger``: the offsets finished above the committed one)."""

    def written(self, tp: Hashable, offset: int) -> str:
        """The metadata for a commit of ``offset`` on ``tp``."""
        ...

    async def read_all(self, found: Mapping[Any, tuple[int | None, str]]) -> None:
        """The committed offset and metadata found for each partition at an assignment."""
        ...

    def grew(self, tp: Hashable, offset: int) -> bool:
        """True when more offsets above ``offset`` finished than its last commit named."""
        ...


class Ledger:
    """Per partition, the offsets known finished: read back from the commit at assignment,
    and the tracker's finished entries; writes the metadata of each commit.

    With ``marks`` (Redis, ``marks.py``), each published offset is also marked there under the
    partition's token, and an assignment reads the marks above the committed offset too.

    Methods are called on the event loop (the transport calls ``written`` before it hands a
    commit to its thread, and ``read_all`` after the seek to the committed offsets).

    Usage::

        ledger = Ledger(tracker, max_bytes=4096, marks=PublishedMarks(redis, prefix))
        await ledger.read_all({tp: (committed, metadata)})  # after an assignment's seek
        if ledger.skips(tp, offset): ...         # published already: finish it, do not redo it
        ledger.published(tp, offset)             # its output is acknowledged: mark it
        metadata = ledger.written(tp, offset)    # for a commit of ``offset``
    """

    def __init__(self, tracker: AckTracker[Any], max_bytes: int = 4096,
                 marks: PublishedMarks | None = None) -> None:
        self._tracker = tracker
        self._max_bytes = max_bytes
        self.marks = marks
        self._known: dict[Hashable, Runs] = {}
        self._named: dict[Hashable, tuple[int, int]] = {}  # tp -> (offset, finished) last written
        self._tokens: dict[Hashable, str] = {}  # tp -> its history's token (every commit's)
        self._floor: dict[Hashable, int] = {}  # tp -> the committed offset last read or written

    def read(self, tp: Hashable, offset: int | None, metadata: str | None) -> int:
        """The commit found at an assignment; returns how many offsets it names finished."""
        runs = decode(metadata, offset) if self._max_bytes else Runs()
        if runs:
            self._known[tp] = runs
        else:
            self._known.pop(tp, None)
        if self._max_bytes:
            # no token of ours: a history we cannot vouch for; marks go under a new one
            self._tokens[tp] = token_of(metadata) or new_token()
            self._floor[tp] = offset or 0
        return len(runs)

    async def read_all(self, found: Mapping[Any, tuple[int | None, str]]) -> None:
        """Every commit found at an assignment, then the marks above them (at most
        ``marks.read_seconds``: a Redis that does not answer leaves them redone)."""
        for tp, (offset, metadata) in found.items():
            self.read(tp, offset, metadata)
        if self.marks is None or not self._max_bytes or not found:
            return
        want = {tp: (self._tokens[tp], self._floor[tp]) for tp in found}
        got = await self.marks.read(want)
        for tp, runs in got.items():
            known = self._known.get(tp)
            self._known[tp] = runs if known is None else known.union(runs)
            log.debug("partition %s: %d offsets marked published above the commit", tp, len(runs))

    def published(self, tp: Hashable, offset: int) -> None:
        """``offset``'s output is acknowledged by the broker: mark it (``marks.py``)."""
        token = self._tokens.get(tp)
        if self.marks is not None and token is not None:
            self.marks.add(tp, token, offset, self._floor[tp])

    def skips(self, tp: Hashable, offset: int) -> bool:
        """True when the commit read at assignment, or a mark above it, names ``offset``
        published (``read_all``)."""
        known = self._known.get(tp)
        return known is not None and offset in known

    def grew(self, tp: Hashable, offset: int) -> bool:
        """True when more offsets at or above ``offset`` are finished than the last metadata
        written for ``offset`` named (a commit of the same offset would tell more)."""
        if not self._max_bytes:
            return False
        last = self._named.get(tp)
        finished = len(self._tracker.finished_from(tp, offset))
        return finished > 0 and (last is None or last[0] != offset or last[1] < finished)

    def written(self, tp: Hashable, offset: int) -> str:
        """The metadata for a commit of ``offset`` (the next offset to read) on ``tp``."""
        if not self._max_bytes:
            return ""
        finished = self._tracker.finished_from(tp, offset)
        self._named[tp] = (offset, len(finished))
        self._floor[tp] = offset
        done = Runs.of(finished)
        known = self._known.get(tp)
        if known is not None:
            known = known.from_(offset)  # what the committed offset passed is settled
            if known:
                self._known[tp] = known
                done = done.union(known)
            else:
                del self._known[tp]
        return encode(offset, done, self._max_bytes, self._tokens.get(tp, ""))

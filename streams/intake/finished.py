"""Offsets finished above the committed one, carried in the offset commit's metadata.

In-order commits trail the finished work: a slow or rate-limited head holds the committed
offset back while thousands of later records are answered and published. After a crash or a
rebalance the new owner starts at the committed offset, so all of them would be answered
(and published) again. As Confluent's Parallel Consumer does, every commit carries the set of
offsets at or above the committed one whose output is already published, and the next owner
skips them (``Ledger``).

The encoding (``encode``/``decode``) is a short ASCII string: ``MAGIC`` then base64 (URL
alphabet, no padding) of zlib-compressed bytes: a format byte, the committed offset and the
finished set as either a bitset or varint run lengths (whichever is shorter). It never
exceeds ``max_bytes`` (the broker's ``offset.metadata.max.bytes``, 4,096 by default): when the
whole set does not fit, only its lowest runs are written, and when not even one fits the
metadata is empty (today's behaviour: everything above the committed offset is redone).
Metadata that is not ours, is corrupt, or names another committed offset decodes to nothing:
an offset is skipped only on positive evidence, so the worst case is a redone record.

Usage::

    meta = encode(committed, finished_offsets, max_bytes=4096)
    runs = decode(meta, committed)     # Runs; empty when foreign or corrupt
    if offset in runs: ...
"""

from __future__ import annotations

import base64
import binascii
import bisect
import zlib
from collections.abc import Hashable, Iterable
from typing import Any, Protocol

from streams.intake.acks import AckTracker

MAGIC = "lls1:"
_BITSET = 0x62  # b"b"
_RUNS = 0x72  # b"r"
# Decoding bounds (what a hostile or corrupt string may cost us): the span a set may cover
# and the bytes decompression may produce.
MAX_SPAN = 1 << 22
_MAX_RAW = MAX_SPAN // 8 + 64
_BITSET_SPAN = 1 << 17
_MAX_RUNS = 1 << 18


class Runs:
    """A set of offsets as sorted, disjoint half-open runs ``[start, end)``."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, runs: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in runs:
            self._append(start, end)

    def _append(self, start: int, end: int) -> None:
        if end <= start:
            return
        if self._ends and start <= self._ends[-1]:
            if start < self._starts[-1]:
                raise ValueError("runs must be sorted")
            self._ends[-1] = max(self._ends[-1], end)
            return
        self._starts.append(start)
        self._ends.append(end)

    @classmethod
    def of(cls, offsets: Iterable[int]) -> Runs:
        """Runs of a set of offsets (any order, duplicates allowed)."""
        out = cls()
        for off in sorted(set(offsets)):
            out._append(off, off + 1)
        return out

    def __contains__(self, offset: object) -> bool:
        if not isinstance(offset, int):
            return False
        i = bisect.bisect_right(self._starts, offset) - 1
        return i >= 0 and offset < self._ends[i]

    def __len__(self) -> int:
        """How many offsets (not runs)."""
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Runs) and self.runs() == other.runs()

    def __repr__(self) -> str:
        return f"Runs({self.runs()!r})"

    def runs(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def offsets(self) -> list[int]:
        return [o for s, e in zip(self._starts, self._ends, strict=True) for o in range(s, e)]

    def from_(self, base: int) -> Runs:
        """The runs at or above ``base``."""
        i = bisect.bisect_right(self._ends, base)
        out = Runs()
        out._starts = [max(base, s) for s in self._starts[i:]]
        out._ends = self._ends[i:]
        return out

    def union(self, other: Runs) -> Runs:
        return Runs(sorted(self.runs() + other.runs()))


def encode(base: int, finished: Runs, max_bytes: int = 4096) -> str:
    """Metadata naming the offsets of ``finished`` at or above ``base`` (the committed offset).

    At most ``max_bytes`` characters: the lowest runs that fit, or ``""``.
    """
    runs = [(s - base, e - base) for s, e in finished.from_(base).runs()[:_MAX_RUNS]]
    while runs and runs[-1][1] > MAX_SPAN:  # beyond what decode() accepts: drop, never clip wrongly
        s, e = runs.pop()
        if s < MAX_SPAN:
            runs.append((s, MAX_SPAN))
    if not runs:
        return ""
    writer = _Writer(base, runs)
    # The longest prefix of runs that fits: grow k fourfold while it fits (a set that fits
    # costs one or two tries), then bisect between the last fit (lo) and the first miss (hi).
    lo, hi, best = 0, len(runs) + 1, ""
    k = min(len(runs), 256)
    while k < hi:
        text = writer.text(k)
        if len(text) > max_bytes:
            hi = k
            break
        lo, best = k, text
        if k == len(runs):
            return text
        k = min(len(runs), k * 4)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        text = writer.text(mid)
        if len(text) <= max_bytes:
            lo, best = mid, text
        else:
            hi = mid
    return best


class _Writer:
    """Encodes prefixes of one list of runs (relative to ``base``), each run's bytes made once."""

    def __init__(self, base: int, runs: list[tuple[int, int]]) -> None:
        self._head = _varint(base)
        self._runs = runs
        self._pieces: list[bytes] = []
        self._bits = bytearray()

    def _extend(self, k: int) -> None:
        runs, pieces, bits = self._runs, self._pieces, self._bits
        prev = runs[len(pieces) - 1][1] if pieces else 0
        for s, e in runs[len(pieces):k]:
            pieces.append(_varint(s - prev) + _varint(e - s))
            prev = e
            if e <= _BITSET_SPAN:  # a bitset wins when runs are short; beyond, runs always do
                if len(bits) < (e + 7) // 8:
                    bits.extend(bytes((e + 7) // 8 - len(bits)))
                for o in range(s, e):
                    bits[o >> 3] |= 1 << (o & 7)

    def text(self, k: int) -> str:
        """The metadata of the lowest ``k`` runs."""
        self._extend(k)
        raw = bytes([_RUNS]) + self._head + b"".join(self._pieces[:k])
        span = self._runs[k - 1][1]
        if span <= _BITSET_SPAN:
            bits = bytearray(self._bits[:(span + 7) // 8])
            if span & 7:  # a later run may share the last byte: keep only offsets below span
                bits[-1] &= (1 << (span & 7)) - 1
            as_bits = bytes([_BITSET]) + self._head + bytes(bits)
            raw = min(raw, as_bits, key=len)
        packed = base64.urlsafe_b64encode(zlib.compress(raw, 6)).rstrip(b"=")
        return MAGIC + packed.decode("ascii")


def decode(metadata: str | None, base: int | None) -> Runs:
    """The finished offsets ``metadata`` names for committed offset ``base``; empty when the
    metadata is absent, foreign, corrupt, or was written for another committed offset."""
    if not metadata or base is None or not metadata.startswith(MAGIC):
        return Runs()
    try:
        text = metadata[len(MAGIC):].encode("ascii")
        packed = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, _MAX_RAW)
        if inflater.unconsumed_tail or not inflater.eof:
            return Runs()
        return _decode_raw(raw, base)
    except (ValueError, binascii.Error, zlib.error, IndexError, UnicodeEncodeError):
        return Runs()


def _decode_raw(raw: bytes, base: int) -> Runs:
    kind = raw[0]
    pos = 1
    written_base, pos = _read_varint(raw, pos)
    if written_base != base:
        return Runs()
    out = Runs()
    if kind == _RUNS:
        prev = 0
        while pos < len(raw):
            gap, pos = _read_varint(raw, pos)
            length, pos = _read_varint(raw, pos)
            start = prev + gap
            prev = start + length
            if prev > MAX_SPAN:
                return Runs()
            out._append(base + start, base + prev)
        return out
    if kind == _BITSET:
        bits = raw[pos:]
        if len(bits) * 8 > MAX_SPAN:
            return Runs()
        for i, byte in enumerate(bits):
            if byte == 0xFF:
                out._append(base + i * 8, base + i * 8 + 8)
            elif byte:
                for b in range(8):
                    if byte >> b & 1:
                        o = base + i * 8 + b
                        out._append(o, o + 1)
        return out
    return Runs()


def _varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("negative")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        byte = raw[pos]  # IndexError when truncated: corrupt
        pos += 1
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return n, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


class CommitMetadata(Protocol):
    """The metadata each commit carries, and what is read back at an assignment
    (``finished.Ledger``: the offsets finished above the committed one)."""

    def written(self, tp: Hashable, offset: int) -> str:
        """The metadata for a commit of ``offset`` on ``tp``."""
        ...

    def read(self, tp: Hashable, offset: int | None, metadata: str | None) -> int:
        """The committed offset and metadata found for ``tp`` at an assignment."""
        ...

    def grew(self, tp: Hashable, offset: int) -> bool:
        """True when more offsets above ``offset`` finished than its last commit named."""
        ...


class Ledger:
    """Per partition, the offsets known finished: read back from the commit at assignment,
    and the tracker's finished entries; writes the metadata of each commit.

    Methods are called on the event loop (the transport calls ``written`` before it hands a
    commit to its thread, and ``read`` after the seek to the committed offsets).

    Usage::

        ledger = Ledger(tracker, max_bytes=4096)
        ledger.read(tp, committed, metadata)     # after an assignment's seek
        if ledger.skips(tp, offset): ...         # published already: finish it, do not redo it
        metadata = ledger.written(tp, offset)    # for a commit of ``offset``
    """

    def __init__(self, tracker: AckTracker[Any], max_bytes: int = 4096) -> None:
        self._tracker = tracker
        self._max_bytes = max_bytes
        self._known: dict[Hashable, Runs] = {}
        self._named: dict[Hashable, tuple[int, int]] = {}  # tp -> (offset, finished) last written

    def read(self, tp: Hashable, offset: int | None, metadata: str | None) -> int:
        """The commit found at an assignment; returns how many offsets it names finished."""
        runs = decode(metadata, offset) if self._max_bytes else Runs()
        if runs:
            self._known[tp] = runs
        else:
            self._known.pop(tp, None)
        return len(runs)

    def skips(self, tp: Hashable, offset: int) -> bool:
        """True when the commit read at assignment names ``offset`` finished."""
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
        done = Runs.of(finished)
        known = self._known.get(tp)
        if known is not None:
            known = known.from_(offset)  # what the committed offset passed is settled
            if known:
                self._known[tp] = known
                done = done.union(known)
            else:
                del self._known[tp]
        return encode(offset, done, self._max_bytes)

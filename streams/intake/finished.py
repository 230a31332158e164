"""Offsets finished above the committed one, carried in the offset commit's metadata.

In-order commits trail the finished work: a slow or rate-limited head holds the committed
offset back while thousands of later records are answered and published. After a crash or a
rebalance the new owner starts at the committed offset, so all of them would be answered
(and published) again. As Confluent's Parallel Consumer does, every commit carries the set of
offsets at or above the committed one whose output is already published, and the next owner
skips them (``ledger.Ledger``).

The encoding (``encode``/``decode``) is a short ASCII string: ``MAGIC`` then base64 (URL
alphabet, no padding) of zlib-compressed bytes: a format byte, the committed offset and the
finished set as either a bitset or varint run lengths (whichever is shorter). It never
exceeds ``max_bytes`` (the broker's ``offset.metadata.max.bytes``, 4,096 by default): when the
whole set does not fit, only its lowest runs are written, and when not even one fits the
metadata is empty (today's behaviour: everything above the committed offset is redone).
Metadata that is not ours, is corrupt, or names another committed offset decodes to nothing:
an offset is skipped only on positive evidence, so the worst case is a redone record.

A commit's metadata names only what finished before it; what is published after the last
commit is marked in Redis (``marks.py``) under the partition's *token*, which every commit of
ours carries (``MAGIC_TOKEN``, then the token, a dot and the encoding above, possibly empty).
A commit written by anything else (an offset reset, a new consumer of the group) carries none,
so the marks of an older history are never read back: the next owner draws a new token.

Usage::

    meta = encode(committed, finished_offsets, max_bytes=4096, token=new_token())
    runs = decode(meta, committed)     # Runs; empty when foreign or corrupt
    token = token_of(meta)             # None when foreign or corrupt
    if offset in runs: ...
"""

from __future__ import annotations

import base64
import binascii
import bisect
import re
import secrets
import zlib
from collections.abc import Iterable

MAGIC = "lls1:"
MAGIC_TOKEN = "lls2:"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{11}")  # new_token(): 8 random bytes, URL-safe base64
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


def new_token() -> str:
    """A partition history's token: 11 URL-safe characters."""
    return secrets.token_urlsafe(8)


def token_of(metadata: str | None) -> str | None:
    """The token a commit's metadata carries; None when it has none (or is not ours)."""
    if not metadata or not metadata.startswith(MAGIC_TOKEN):
        return None
    token = metadata[len(MAGIC_TOKEN):len(MAGIC_TOKEN) + 11]
    ok = _TOKEN.fullmatch(token) and metadata[len(MAGIC_TOKEN) + 11:len(MAGIC_TOKEN) + 12] == "."
    return token if ok else None


def encode(base: int, finished: Runs, max_bytes: int = 4096, token: str = "") -> str:
    """Metadata naming the offsets of ``finished`` at or above ``base`` (the committed offset),
    and ``token`` when given.

    At most ``max_bytes`` characters: the lowest runs that fit, or only the token, or ``""``.
    """
    head = f"{MAGIC_TOKEN}{token}." if token else MAGIC
    bare = head if token and len(head) <= max_bytes else ""
    runs = [(s - base, e - base) for s, e in finished.from_(base).runs()[:_MAX_RUNS]]
    while runs and runs[-1][1] > MAX_SPAN:  # beyond what decode() accepts: drop, never clip wrongly
        s, e = runs.pop()
        if s < MAX_SPAN:
            runs.append((s, MAX_SPAN))
    if not runs:
        return bare
    writer = _Writer(base, runs, head)
    # The longest prefix of runs that fits: grow k fourfold while it fits (a set that fits
    # costs one or two tries), then bisect between the last fit (lo) and the first miss (hi).
    lo, hi, best = 0, len(runs) + 1, bare
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

    def __init__(self, base: int, runs: list[tuple[int, int]], magic: str = MAGIC) -> None:
        self._magic = magic
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
        return self._magic + packed.decode("ascii")


def decode(metadata: str | None, base: int | None) -> Runs:
    """The finished offsets ``metadata`` names for committed offset ``base``; empty when the
    metadata is absent, foreign, corrupt, or was written for another committed offset."""
    if not metadata or base is None:
        return Runs()
    if token_of(metadata) is not None:
        metadata = MAGIC + metadata[len(MAGIC_TOKEN) + 12:]
    if not metadata.startswith(MAGIC) or metadata == MAGIC:
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

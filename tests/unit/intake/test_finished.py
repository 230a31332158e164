"""The commit-metadata encoding of finished offsets: round trip, size cap, foreign or corrupt input."""

from __future__ import annotations

import base64
import random
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.intake.acks import AckTracker
from streams.intake.finished import (
    MAGIC,
    MAX_SPAN,
    Runs,
    decode,
    encode,
    new_token,
    token_of,
)
from streams.intake.ledger import Ledger

offsets_above = st.sets(st.integers(min_value=0, max_value=50_000), max_size=3000)
bases = st.integers(min_value=0, max_value=2**62)


@settings(max_examples=200, deadline=None)
@given(base=bases, rel=offsets_above)
def test_round_trip_when_it_fits(base: int, rel: set[int]) -> None:
    finished = Runs.of(base + r for r in rel)
    meta = encode(base, finished, max_bytes=1 << 20)
    assert len(meta) <= 1 << 20
    assert meta.isascii()
    assert decode(meta, base) == finished
    if rel:
        assert decode(meta, base + 1) == Runs()  # written for another committed offset


@settings(max_examples=200, deadline=None)
@given(base=bases, rel=offsets_above, cap=st.integers(min_value=0, max_value=600))
def test_never_over_the_cap_and_never_names_an_unfinished_offset(
    base: int, rel: set[int], cap: int
) -> None:
    finished = Runs.of(base + r for r in rel)
    meta = encode(base, finished, max_bytes=cap)
    assert len(meta) <= cap
    got = decode(meta, base)
    assert set(got.offsets()) <= set(finished.offsets())
    # what is kept is the lowest part of the set: a prefix, never holes in the middle
    if got:
        top = got.runs()[-1][1]
        assert set(got.offsets()) == {o for o in finished.offsets() if o < top}


def test_offsets_below_the_committed_one_are_not_written() -> None:
    finished = Runs([(10, 20), (30, 31)])
    assert decode(encode(15, finished), 15) == Runs([(15, 20), (30, 31)])
    assert encode(31, finished) == ""


def test_a_worst_case_set_in_4096_bytes_keeps_thousands_of_offsets() -> None:
    rng = random.Random(3)
    finished = Runs.of(1000 + o for o in range(20_000) if rng.random() < 0.5)
    meta = encode(1000, finished, max_bytes=4096)
    assert len(meta) <= 4096
    kept = len(decode(meta, 1000))
    assert kept > 9000, kept  # a random half of 20,000 offsets: the bitset holds them all
    long_runs = Runs([(1000 + 100 * i, 1000 + 100 * i + 60) for i in range(100_000)])
    meta = encode(1000, long_runs, max_bytes=4096)
    assert len(meta) <= 4096 and len(decode(meta, 1000)) > 100_000


def test_nothing_fits_means_no_metadata() -> None:
    assert encode(0, Runs([(5, 6)]), max_bytes=5) == ""
    assert encode(0, Runs(), max_bytes=4096) == ""


def test_spans_beyond_the_decodable_limit_are_dropped_not_clipped_wrongly() -> None:
    finished = Runs([(0, 10), (MAX_SPAN - 2, MAX_SPAN + 5), (MAX_SPAN + 100, MAX_SPAN + 101)])
    got = decode(encode(0, finished, max_bytes=1 << 20), 0)
    assert got == Runs([(0, 10), (MAX_SPAN - 2, MAX_SPAN)])


def _ours(raw: bytes) -> str:
    return MAGIC + base64.urlsafe_b64encode(zlib.compress(raw)).decode().rstrip("=")


def test_foreign_and_corrupt_metadata_decode_to_nothing() -> None:
    good = encode(7, Runs([(8, 12), (20, 21)]))
    samples = [
        None, "", "hello", "{\"a\": 1}", MAGIC, MAGIC + "!!!", MAGIC + "AAAA",
        good[:-3], good + "x", good.replace(MAGIC, "lls2:"),
        # Parallel Consumer's metadata looks like base64 of its own binary encoding
        base64.b64encode(b"\x02\x00\x01" + bytes(40)).decode(),
        _ours(b""), _ours(b"q\x07\x01\x02"),  # unknown format byte
        _ours(b"r\x07\x80"),  # truncated varint
        _ours(b"r\x07" + b"\xff" * 20),  # varint too long
        _ours(b"r\x07\x01\x7f" * 3 + b"\xff\xff\xff\x7f\x01"),  # past the span limit
        _ours(b"b\x07" + b"\xff" * (MAX_SPAN // 8 + 1)),  # a bitset past the span limit
        MAGIC + base64.urlsafe_b64encode(zlib.compress(b"r\x07" + b"\x00" * (1 << 24))).decode(),
        "lls1:\u00e9\u00e9",
    ]
    for meta in samples:
        assert decode(meta, 7) == Runs(), meta


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200), tail=st.binary(max_size=200))
def test_any_string_decodes_without_raising(text: str, tail: bytes) -> None:
    decode(text, 0)
    decode(MAGIC + text, 0)
    decode(_ours(tail), 0)
    decode(_ours(b"r\x00" + tail), 0)
    decode(_ours(b"b\x00" + tail), 0)


def test_runs_membership_and_slicing() -> None:
    runs = Runs([(1, 3), (3, 5), (10, 11)])
    assert runs.runs() == [(1, 5), (10, 11)]
    assert [o in runs for o in (0, 1, 4, 5, 10, 11)] == [False, True, True, False, True, False]
    assert "1" not in runs
    assert runs.from_(4).runs() == [(4, 5), (10, 11)]
    assert runs.union(Runs([(5, 7)])).runs() == [(1, 7), (10, 11)]
    assert len(runs) == 5



def test_the_ledger_recommits_an_offset_only_when_more_finished_above_it() -> None:
    tracker: AckTracker[str] = AckTracker()
    ledger = Ledger(tracker, max_bytes=4096)
    tp = ("t", 0)
    for off in range(10, 15):
        tracker.add(tp, off, f"m{off}")
    assert not ledger.grew(tp, 10)  # nothing finished above the head
    tracker.finish(tp, 12)
    assert ledger.grew(tp, 10)
    assert decode(ledger.written(tp, 10), 10) == Runs([(12, 13)])
    assert not ledger.grew(tp, 10)  # the last commit said it all
    tracker.finish(tp, 13)
    assert ledger.grew(tp, 10)
    ledger.written(tp, 10)
    assert ledger.grew(tp, 9) and not ledger.grew(tp, 10)
    assert not Ledger(tracker, max_bytes=0).grew(tp, 10)
    assert Ledger(tracker, max_bytes=0).written(tp, 10) == ""


def test_what_the_ledger_read_back_is_kept_until_the_commit_passes_it() -> None:
    tracker: AckTracker[str] = AckTracker()
    ledger = Ledger(tracker)
    tp = ("t", 0)
    assert ledger.read(tp, 100, encode(100, Runs([(101, 103), (200, 201)]))) == 3
    assert ledger.skips(tp, 101) and ledger.skips(tp, 200) and not ledger.skips(tp, 100)
    assert decode(ledger.written(tp, 102), 102) == Runs([(102, 103), (200, 201)])
    assert not ledger.skips(tp, 101)  # below the committed offset: settled
    token = token_of(ledger.written(tp, 102))
    assert token is not None  # drawn at the read: the commit it read carried none
    # nothing above 201 is finished: the metadata carries the token alone
    assert ledger.written(tp, 201) == f"lls2:{token}." and not ledger.skips(tp, 200)
    assert ledger.read(tp, 100, "garbage") == 0 and not ledger.skips(tp, 200)


@settings(max_examples=200, deadline=None)
@given(base=bases, rel=offsets_above, max_bytes=st.integers(min_value=0, max_value=600))
def test_a_token_rides_every_commit_that_has_room_for_it(base: int, rel: set[int],
                                                          max_bytes: int) -> None:
    token = new_token()
    meta = encode(base, Runs.of(base + r for r in rel), max_bytes=max_bytes, token=token)
    assert len(meta) <= max_bytes
    head = f"lls2:{token}."
    if len(head) <= max_bytes:  # the token fits: it is there, with the lowest runs that fit
        assert meta.startswith(head) and token_of(meta) == token
        named = decode(meta, base)
        assert set(named.offsets()) <= {base + r for r in rel}
        assert named == Runs.of(base + r for r in rel) or len(meta) > max_bytes - 40
    else:
        assert meta == ""


@given(st.text(max_size=40))
def test_a_token_is_read_only_from_a_well_formed_head(text: str) -> None:
    token = token_of(text)
    assert token is None or (text.startswith(f"lls2:{token}.") and len(token) == 11)
    assert decode(text, 0) == Runs() or text.startswith(("lls1:", "lls2:"))


def test_foreign_or_malformed_tokens_are_not_ours() -> None:
    assert token_of("lls1:abc") is None and token_of("") is None and token_of(None) is None
    assert token_of("lls2:short.") is None
    assert token_of("lls2:{bad{token}.") is None  # no Redis hash tag can be smuggled in
    assert token_of("lls2:AAAAAAAAAAA") is None  # no dot
    assert token_of("lls2:AAAAAAAAAAA.") == "AAAAAAAAAAA"
    assert decode("lls2:AAAAAAAAAAA.", 5) == Runs()
    assert decode("lls2:AAAAAAAAAAA.garbage", 5) == Runs()


def test_the_ledger_keeps_the_token_it_read_and_draws_one_for_a_commit_without() -> None:
    tracker: AckTracker[str] = AckTracker()
    ledger = Ledger(tracker)
    a, b = ("t", 0), ("t", 1)
    ledger.read(a, 10, encode(10, Runs(), token="AAAAAAAAAAA"))
    ledger.read(b, 10, encode(10, Runs([(11, 12)])))  # an older worker's: no token
    assert token_of(ledger.written(a, 10)) == "AAAAAAAAAAA"
    drawn = token_of(ledger.written(b, 10))
    assert drawn is not None and drawn != "AAAAAAAAAAA"
    ledger.read(b, 0, "")  # an offset reset: a commit with no metadata
    again = token_of(ledger.written(b, 0))
    assert again is not None and again != drawn  # the older history's marks are not read

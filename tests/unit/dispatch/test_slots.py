"""Future slots in fair-queue order: a grant with a smaller tag takes the earliest later-tagged
slot, the others move back in order; steal takes the largest tag above; tpm left alone."""

from __future__ import annotations

from streams.config import EndpointConfig
from streams.dispatch.admission import Grant
from streams.dispatch.ratelimit import Permit
from streams.dispatch.slots import SlotBook
from tests.fakes.clock import Clock

EP = EndpointConfig(name="e", url="http://e.test/v1")
TPM = EndpointConfig(name="t", url="http://t.test/v1", tpm=1000)


def _grant(at: float, tag: float | None, tenant: str = "a", ep: EndpointConfig = EP) -> Grant:
    return Grant(ep, Permit(ep, 1, shared=True), False, at, tenant=tenant,
                 tag=None if tag is None else (5, tag))


def test_a_smaller_tag_takes_the_earliest_later_tagged_slot() -> None:
    clock = Clock(100.0)
    book = SlotBook(clock)
    flood = [_grant(100.01 * 1 + i * 0.01, 10.0 + i) for i in range(5)]
    for g in flood:
        book.place(g)
    newcomer = _grant(100.06, 11.5, "b")
    book.place(newcomer)
    # tags 10 and 11 keep their slots; the newcomer takes 12's, and 12.. move back one each
    assert [round(g.at, 2) for g in flood] == [100.01, 100.02, 100.04, 100.05, 100.06]
    assert round(newcomer.at, 2) == 100.03
    other_level = Grant(EP, Permit(EP, 1, shared=True), False, 100.07, tenant="c", tag=(0, 0.0))
    book.place(other_level)
    assert other_level.at == 100.07  # levels are not compared


def test_steal_takes_the_largest_tag_above_and_leaves_due_slots_and_tpm_alone() -> None:
    clock = Clock(100.0)
    book = SlotBook(clock)
    due = _grant(100.001, 50.0)  # within the lead: left to its request
    gs = [_grant(100.01 + i * 0.01, 10.0 + i) for i in range(4)]
    tpm = _grant(100.2, 99.0, ep=TPM)
    for g in [due, *gs, tpm]:
        book.place(g)
    assert book.service_tag(5) == 10.0
    got = book.steal((5, 11.5), lambda g: True)
    assert got is gs[3] and got.revoked and got.released
    assert book.steal((5, 12.5), lambda g: True) is None  # 12 and below are ahead of it
    assert book.steal((5, 1.0), lambda g: g.tenant == "x") is None
    assert not due.revoked and not tpm.revoked

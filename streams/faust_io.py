"""faust's aiokafka transport, delivering a fetched record without four tasks per record.

It also fixes one crash of faust's consumer thread after a rebalance (``_ConsumerThread``).

faust's consumer hands each fetched record to the conductor with
``Service.wait_first(callback(message), suspend_flow.wait())``: four tasks (the delivery,
the suspend event, the service's stopped and crashed events) and an ``asyncio.wait`` per
record, only so that a delivery blocked on a full buffer or on flow control can be abandoned
when a rebalance begins. That costs more than our whole cache-hit path (BENCHMARKS.md).

``DirectDeliveryConsumer`` awaits the conductor's callback directly whenever it cannot block:
flow is not suspended, flow control is active and every channel of the record's partition
has room in its queue. Otherwise (a rebalance, a full buffer) it takes faust's own path,
unchanged. The rest of ``_drain_messages`` is faust-streaming 0.15.3's, line for line;
``tests/unit/test_faust_io.py`` fails when the installed faust's own ``_drain_messages``
differs from the one this copy was made from, so an upgrade is reviewed.

Usage::

    class MyApp(faust.App):
        def _new_transport(self) -> TransportT:
            return new_transport(self)
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as driver
from faust.types import TP, AppT, TransportT
from mode import Service, ServiceT

#: SHA-256 of the source of faust's ``Consumer._drain_messages`` that this module copies.
UPSTREAM_DRAIN_SHA256 = "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417"


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    """faust's consumer thread, minus a crash when a rebalance revoked every offset to commit.

    faust filters the offsets to commit by the current assignment inside the thread; if a
    rebalance revoked all of them meanwhile, it hands aiokafka an empty dict, aiokafka raises
    ``ValueError({})`` and faust crashes the worker (seen in the scale 1-3-1 fault test).
    Nothing of ours is left to commit then: the new owners redeliver from the last commit.
    """

    async def _commit(self, offsets: Mapping[TP, int]) -> bool:
        assigned = self.assignment()
        if not any(tp in assigned for tp in offsets):
            return False
        return bool(await super()._commit(offsets))


class DirectDeliveryConsumer(driver.Consumer):
    """See the module docstring."""

    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def _can_deliver_now(self, tp: Any) -> bool:
        """True when the conductor's callback for ``tp`` cannot block (nothing to abandon)."""
        if self.suspend_flow.is_set() or not self.app.flow_control.is_active():
            return False
        channels = self.app.topics._tp_index.get(tp)  # type: ignore[attr-defined]
        if not channels:
            return False  # unknown to the conductor: faust's own path decides
        for chan in channels:
            if chan.queue.full():
                return False
        return True

    async def _drain_messages(self, fetcher: ServiceT) -> None:  # noqa: C901 (faust's)
        # faust-streaming 0.15 Consumer._drain_messages, but for the marked delivery.
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = cast(Service, fetcher)._stopped.is_set

        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        flag_consumer_fetching = CONSUMER_FETCHING
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        can_deliver_now = self._can_deliver_now

        yield_every = 100
        num_since_yield = 0
        sleep = asyncio.sleep

        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(flag_consumer_fetching)
                ait = getmany(timeout=1.0)

                # Sleeping because sometimes getmany is called in a loop
                # never releasing to the event loop
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await sleep(0)
                            num_since_yield = 0

                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            # We have a gap in income messages
                            if gap > 1 and r_offset:
                                acks_enabled = acks_enabled_for(message.topic)
                                if acks_enabled:
                                    await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None:
                                if self._n_acked >= commit_every:
                                    self._n_acked = 0
                                    await self.commit()
                            # llm-streams: the one change (see the module docstring).
                            if can_deliver_now(tp):
                                await callback(message)
                            else:
                                await self.wait_first(
                                    callback(message), self.suspend_flow.wait()
                                )
                            set_read_offset(tp, offset)
                        else:
                            self.log.dev(
                                "DROPPED MESSAGE ROFF %r: k=%r v=%r",
                                offset,
                                message.key,
                                message.value,
                            )
                    unset_flag(flag_consumer_fetching)

        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                # we're already stopping so ignore
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                # we're already stopping so ignore
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(flag_consumer_fetching)


class DirectDeliveryTransport(driver.Transport):
    """faust's aiokafka transport with ``DirectDeliveryConsumer``."""

    Consumer = DirectDeliveryConsumer


def new_transport(app: AppT) -> TransportT:
    """The consumer transport for ``app`` (what ``faust.App._new_transport`` builds)."""
    return DirectDeliveryTransport(app.conf.broker_consumer, app)

"""faust's aiokafka transport, delivering a fetched record without four tasks per record.

Its consumer thread (``_ConsumerThread``) also:

- reads with ``kafka.isolation_level`` (faust itself reads uncommitted records unless it
  runs transactions, so a record of an aborted transaction would be answered);
- holds a partition whose fetched bytes cannot be decoded (a codec we lack, a corrupt
  batch) instead of letting aiokafka's error kill the worker: the records before the bad
  batch are delivered, the partition is then not fetched again, and one log line names
  the partition and offset (``unreadable_partitions`` feeds ``/readyz``). The other
  partitions keep flowing; a rebalance or a seek releases the hold (it is tried again);
- does not crash after a rebalance revoked every offset to commit;
- writes each commit's metadata and reads it back at an assignment (``CommitMetadata``:
  the offsets finished above the committed one, ``finished.py``).

faust's consumer hands each fetched record to the conductor with
``Service.wait_first(callback(message), suspend_flow.wait())``: four tasks (the delivery,
the suspend event, the service's stopped and crashed events) and an ``asyncio.wait`` per
record, only so that a delivery blocked on a full buffer or on flow control can be abandoned
when a rebalance begins. That costs more than our whole cache-hit path (BENCHMARKS.md).

``DirectDeliveryConsumer`` awaits the conductor's callback directly whenever it cannot block:
flow is not suspended, flow control is active and every channel of the record's partition
has room in its queue. Otherwise (a rebalance, a full buffer) it takes faust's own path,
unchanged.

It also drops a record gone stale while the loop awaited: faust's loop awaits an inline
commit (every ``broker_commit_every`` acks; a commit can take a second) and the delivery, and
a rebalance can revoke the partition and seek it to its committed offset meanwhile. faust would
then deliver the record fetched before the seek and set the partition's read offset to it,
over the seek's: the records from the committed offset up to it would be dropped as already
read, never answered. The commit then stays behind them (the partition stalls until the next
rebalance), or, when the stale record is the one right after the committed offset, commits
over it (faust's check of the acks' head lets one offset through). Here a record is
delivered only if no seek or revoke came since it was fetched, and the read offset is set
only if none came during its delivery (the seek fetches it again).

The rest of ``_drain_messages`` is faust-streaming 0.15.3's, line for line;
``tests/unit/intake/test_transport.py`` fails when the installed faust's own ``_drain_messages``
differs from the one this copy was made from, so an upgrade is reviewed.

Usage::

    class MyApp(faust.App):
        def _new_transport(self) -> TransportT:
            return new_transport(self)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from time import monotonic
from typing import Any, cast

import aiokafka
from aiokafka.errors import CommitFailedError, OffsetMetadataTooLargeError
from aiokafka.structs import OffsetAndMetadata
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as driver
from faust.types import TP, AppT, TransportT
from mode import Service, ServiceT

from streams.intake.ledger import CommitMetadata
from streams.intake.unreadable import SafeResults

log = logging.getLogger("streams.kafka")

#: SHA-256 of the source of faust's ``Consumer._drain_messages`` that this module copies.
UPSTREAM_DRAIN_SHA256 = "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417"
#: ... of faust's ``AIOKafkaConsumerThread._commit``, aiokafka's ``seek_to_committed`` (redone).
UPSTREAM_COMMIT_SHA256 = "932852ce7a23f658804273d0296de6affaa7d21c19311c279712c2fae91a3b03"
UPSTREAM_SEEK_SHA256 = "f6cd85c8b70a4ccf7e862de24f6c5d985038eed3e140990f000aa4b52eda8d72"


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    """faust's consumer thread with our isolation level, held unreadable partitions and a
    commit that survives a rebalance (see the module docstring)."""

    #: partitions held because their next batch cannot be decoded: tp -> (offset, reason)
    unreadable: dict[TP, tuple[int, str]]
    metadata_refused = False  # the broker refused our commit metadata as too large

    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # faust hard-codes read_uncommitted outside transactions; the fetcher is built from
        # this attribute when the consumer starts.
        level = getattr(transport, "isolation_level", None)
        if level is not None and not self.consumer.in_transaction:
            consumer._isolation_level = level
        self.unreadable = {}
        return consumer

    async def _fetch_records(
        self,
        consumer: aiokafka.AIOKafkaConsumer,
        active_partitions: set[TP],
        timeout: float | None = None,
        max_records: int | None = None,
    ) -> Any:
        fetcher = consumer._fetcher
        if fetcher is not None and type(fetcher._records) is not SafeResults:
            fetcher._records = SafeResults(self.unreadable, fetcher._records)
        return await super()._fetch_records(
            consumer, active_partitions, timeout=timeout, max_records=max_records
        )

    def _metadata(self) -> CommitMetadata | None:
        return None if self.metadata_refused else getattr(self.transport, "commit_metadata", None)

    async def commit(self, offsets: Mapping[TP, int]) -> bool:  # on the loop: the tracker's
        hook = self._metadata()
        metadata = {tp: hook.written(tp, off) for tp, off in offsets.items()} if hook else {}
        return bool(await self.call_thread(self._commit, offsets, metadata))

    async def _commit(self, offsets: Mapping[TP, int],
                      metadata: Mapping[TP, str] | None = None) -> bool:
        # faust's _commit (UPSTREAM_COMMIT_SHA256) with metadata, and: if a rebalance revoked
        # every offset meanwhile, faust would hand aiokafka an empty dict (ValueError, the worker
        # crashes: scale 1-3-1 fault test); nothing is left to commit, the new owners redeliver.
        committable = {tp: off for tp, off in offsets.items() if tp in self.assignment()}
        if not committable:
            return False
        consumer = self._ensure_consumer()
        payload = {driver.ensure_aiokafka_TP(tp): OffsetAndMetadata(off, (metadata or {}).get(tp, ""))
                   for tp, off in committable.items()}
        self.tp_last_committed_at.update(dict.fromkeys(committable, monotonic()))
        try:
            try:
                await consumer.commit(payload)
            except OffsetMetadataTooLargeError:
                # the broker's offset.metadata.max.bytes is below kafka.commit_metadata_max_bytes:
                # from now on commit without it (everything above the commit is redone after a crash)
                self.metadata_refused = True
                log.warning("the broker refused the commit metadata as too large; committing without"
                            " it (set kafka.commit_metadata_max_bytes to offset.metadata.max.bytes)")
                await consumer.commit({tp: OffsetAndMetadata(o.offset, "")
                                       for tp, o in payload.items()})
        except Exception as exc:
            if isinstance(exc, CommitFailedError) and "already rebalanced" in str(exc):
                return False
            self.log.exception("Committing raised exception: %r (assignment %r)", exc,
                               self.assignment())
            await self.crash(exc)
            return False
        return True

    async def seek_to_committed(self) -> Mapping[TP, int]:
        found: dict[TP, tuple[int | None, str]] = await self.call_thread(self._seek_committed)
        if (hook := self._metadata()) is not None:  # back on the event loop
            await hook.read_all(found)
        return {tp: offset for tp, (offset, _) in found.items()}  # type: ignore[misc]

    async def _seek_committed(self) -> dict[TP, tuple[int | None, str]]:
        # aiokafka's seek_to_committed (UPSTREAM_SEEK_SHA256) keeping each commit's metadata
        consumer = self._ensure_consumer()
        tps = consumer._subscription.assigned_partitions()
        commits = await consumer._coordinator.fetch_committed_offsets(tps) if tps else {}
        out: dict[TP, tuple[int | None, str]] = {}
        for tp in tps:
            commit = commits.get(tp)  # left out: no commit yet
            if commit is not None and commit.offset > 0:
                consumer._fetcher.seek_to(tp, commit.offset)
            out[tp] = (commit.offset, commit.metadata or "") if commit is not None else (None, "")
        return out


class DirectDeliveryConsumer(driver.Consumer):
    """See the module docstring."""

    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def _filter_committable_offsets(self, tps: Any) -> dict[TP, int]:
        # faust commits only a moved offset; behind a slow head the records above it finish
        # meanwhile: commit the same offset again when that set grew, for its metadata to say so
        offsets: dict[TP, int] = super()._filter_committable_offsets(tps)
        if (hook := getattr(self.transport, "commit_metadata", None)) is not None:
            for tp in self.assignment():
                committed = self._committed_offset.get(tp)
                if tp not in offsets and committed and hook.grew(tp, committed):
                    offsets[tp] = committed
        return offsets

    moves = 0  # seeks and revokes so far (where to read next was set by a rebalance)

    async def perform_seek(self) -> None:
        self.moves += 1
        try:
            await super().perform_seek()
        finally:
            self.moves += 1

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        self.moves += 1
        await super().on_partitions_revoked(revoked)

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
                        moves = self.moves  # llm-streams
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
                            # llm-streams: a seek or revoke while we awaited (the inline
                            # commit) made this record stale (see the module docstring).
                            if self.moves != moves:
                                continue
                            # llm-streams: the direct delivery (see the module docstring).
                            if can_deliver_now(tp):
                                await callback(message)
                            else:
                                await self.wait_first(
                                    callback(message), self.suspend_flow.wait()
                                )
                            if self.moves == moves:  # llm-streams: else the seek's offset stands
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
    isolation_level: str | None = None  # None: faust's own choice
    commit_metadata: CommitMetadata | None = None  # None: commits carry no metadata


def new_transport(app: AppT, isolation_level: str | None = None,
                  commit_metadata: CommitMetadata | None = None) -> TransportT:
    """The consumer transport for ``app`` (what ``faust.App._new_transport`` builds)."""
    transport = DirectDeliveryTransport(app.conf.broker_consumer, app)
    transport.isolation_level = isolation_level
    transport.commit_metadata = commit_metadata
    return transport


def is_stale(app: Any, msg: Any) -> bool:
    """faust's own test for a record fetched before the current rebalance generation."""
    return bool(msg.generation_id != app.consumer_generation_id
                or not app.flow_control.is_active())


def committed_offsets(consumer: Any) -> dict[Any, int | None]:
    """faust's own record of what it committed (next offset to read), per partition."""
    return dict(getattr(consumer, "_committed_offset", {}))


def consumer_state(app: Any) -> dict[str, Any]:
    """A snapshot of faust's and aiokafka's consumer state for the state dump ({} before start)."""
    if app is None or app._consumer is None:
        return {}
    consumer: Any = app.consumer
    return dict(
        generation=app.consumer_generation_id,
        flow_control_active=app.flow_control.is_active(),
        consumer_flow_active=consumer.flow_active,
        suspend_flow=consumer.suspend_flow.is_set(),
        active=sorted(str(tp.partition) for tp in consumer._active_partitions or ()),
        paused=sorted(str(tp.partition) for tp in consumer._paused_partitions),
        buffered=sorted(str(tp.partition) for tp in consumer._buffered_partitions),
        read={tp.partition: off for tp, off in consumer._read_offset.items()},
        committed={tp.partition: off for tp, off in consumer._committed_offset.items()},
        # (queued events, pending pressure-drop callbacks) of the agent's channel
        queue=next((
            (chan.queue.qsize(), len(chan.queue._pending_pressure_drop_callbacks))
            for chans in getattr(app.topics, "_tp_index", {}).values() for chan in chans
        ), None),
    )

"""The faust agent: a thin app whose agent drains its queue a batch at a time into the runtime.

Shutdown (SIGINT/SIGTERM): stop accepting, let in-flight work finish within
``worker.shutdown_grace_seconds``, commit, exit 0; unfinished work is redelivered later
(``stopping.py`` bounds every step).

Usage::

    app = build_app(settings, Runtime(settings))
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from typing import Any

import faust
from faust.types import TransportT

from streams.config import Settings
from streams.intake.assignor import PartitionAssignor
from streams.intake.runtime import Runtime
from streams.intake.stopping import STOP_MARGIN_SECONDS, STOP_STEP_SECONDS, _StopWatchdog, _within
from streams.intake.transport import new_transport
from streams.kafka_io import connection_options

log = logging.getLogger("streams.worker")

BATCH_MAX = 1024  # records taken from faust's queue at once


class StreamsApp(faust.App):
    """faust.App whose stop drains our in-flight work and commits before faust stops."""

    runtime: Runtime

    def _new_transport(self) -> TransportT:
        # faust's transport, minus four tasks per fetched record (streams/intake/transport.py)
        return new_transport(self, self.runtime.settings.kafka.isolation_level,
                             self.runtime.finished)

    async def on_start(self) -> None:
        await super().on_start()
        await self.runtime.start()

    async def on_stop(self) -> None:
        runtime = self.runtime
        _StopWatchdog.arm(runtime.settings.worker.shutdown_grace_seconds + STOP_MARGIN_SECONDS,
                          lambda: runtime.drained)
        # Stop taking records first (faust's own first step): a rebalance during our drain
        # skips faust's assignment handling once it is stopping, and a fetcher still running
        # would then crash on a record of a newly assigned partition (KeyError in on_message).
        # Bounded, like every step that may wait on Kafka: we take no new record either way.
        await _within(self._stop_consumer(), STOP_STEP_SECONDS, "stopping the consumer")
        await runtime.drain()
        runtime.drained = True  # what is not committed now is redelivered: nothing else to lose
        await _within(self.consumer.commit(), STOP_STEP_SECONDS, "the final commit")
        await super().on_stop()
        await self.runtime.close()


def build_app(settings: Settings, runtime: Runtime) -> StreamsApp:
    s = settings
    credentials: faust.SASLCredentials | faust.SSLCredentials | None = None
    if s.kafka.security_protocol != "PLAINTEXT":
        opts = connection_options(s)
        if s.kafka.security_protocol.startswith("SASL"):
            credentials = faust.SASLCredentials(
                username=opts["sasl_plain_username"],
                password=opts["sasl_plain_password"],
                mechanism=opts["sasl_mechanism"],
                ssl_context=opts.get("ssl_context"),
            )
        else:
            credentials = faust.SSLCredentials(opts["ssl_context"])
    app = StreamsApp(
        s.kafka.group_id,
        broker=[f"kafka://{b}" for b in s.kafka.bootstrap_servers.split(",")],
        broker_credentials=credentials,
        datadir=os.path.join(tempfile.gettempdir(), f"llm-streams-{s.kafka.group_id}"),
        topic_partitions=s.kafka.partitions,
        topic_replication_factor=s.kafka.replication_factor,
        stream_wait_empty=False,  # we drain ourselves; faust's wait would hold rebalances hostage
        # no tables, no standbys: every worker's share within one of the others' (assignor.py)
        table_standby_replicas=0,
        PartitionAssignor=PartitionAssignor,
        broker_commit_interval=s.kafka.commit_interval_seconds,
        broker_session_timeout=s.kafka.session_timeout_seconds,
        consumer_auto_offset_reset="earliest",
        stream_buffer_maxsize=min(4096, max(256, s.limits.max_inflight)),
        producer_acks=-1,
        producer_compression_type=s.kafka.codec,
        web_enabled=False,
        stream_processing_timeout=3600,
    )
    app.runtime = runtime
    runtime.app = app
    topic = app.topic(
        s.topics.requests, key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw",
    )

    async def requests(stream: Any) -> None:
        # The agent drains its channel's queue itself, a batch at a time, instead of
        # iterating the Stream: faust's per-event Stream machinery costs more than our whole
        # cache-hit path (BENCHMARKS.md), and a batch shares one Redis round trip and one
        # produce. We ack ourselves (as with noack()), through the tracker, in offset order.
        queue = stream.channel.queue
        while True:
            try:
                events = [await queue.get()]
            except StopAsyncIteration:  # faust ends the stream at shutdown
                return
            while len(events) < BATCH_MAX:
                try:
                    events.append(queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            try:
                await runtime.submit_batch(events)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the agent die: unacked records are redelivered
                log.exception("could not accept %d records", len(events))

    app.agent(topic, name="llm-requests")(requests)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _revoked(sender: Any, revoked: set[Any], **_: Any) -> None:
        runtime.on_revoked(revoked)
        runtime.assigned = None

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _assigned(sender: Any, assigned: set[Any], **_: Any) -> None:
        # faust's own topics (its leader topic) are assigned too: count only ours
        runtime.on_assigned(assigned)
        mine = sum(1 for tp in assigned if tp.topic == s.topics.requests)
        runtime.assigned = mine
        runtime.metrics.assigned_partitions.set(mine)

    return app

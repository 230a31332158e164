"""The shared state on a real Redis Cluster (3 masters, 3 replicas), in process.

Rate limits held by three limiters (three workers' worth), cooldowns shared and probed once,
cache and idempotency keys spread over every shard while the limiter's keys share one, batched
reads across slots, and a slot moved or a master handed over (``CLUSTER FAILOVER``) while in use:
the client follows the redirections and no guard ever sees an outage.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from redis.asyncio.cluster import RedisCluster

from streams.cache.responses import ResponseCache
from streams.config import EndpointConfig, RetryConfig, Settings, load_settings
from streams.contract import Completion, Request
from streams.dispatch.cooldown import Cooldowns, EndpointState
from streams.dispatch.ratelimit import RateLimiter
from streams.errors import StartupError
from streams.redis_cluster import shared_tag
from streams.redis_conn import SafeConnection
from streams.redis_io import check_redis, open_redis
from tests.fakes.clock import Clock
from tests.fakes.windows import limit_run, max_in_measured_window
from tests.integration.harness import REDIS_HOST, REDIS_PORT
from tests.integration.redis_cluster import LocalCluster
from tests.integration.servers import PrivateRedis

pytestmark = pytest.mark.integration


def _settings(cluster: LocalCluster, prefix: str, **ep: Any) -> Settings:
    endpoint = EndpointConfig(name="ep", url="http://ep.test/v1", timeout_seconds=5, **ep)
    return load_settings(environ={}, endpoints=[endpoint],
                         redis={"url": cluster.url, "cluster": True, "key_prefix": prefix})


@pytest.fixture
def prefix() -> str:
    return f"it-cl-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def clients(redis_cluster: LocalCluster, prefix: str) -> AsyncIterator[list[Any]]:
    """Three cluster clients, as three worker processes would have."""
    made = [open_redis(_settings(redis_cluster, prefix)) for _ in range(3)]
    try:
        yield made
    finally:
        for c in made:
            await c.aclose()


def _slot(key: str) -> int:
    from redis.crc import key_slot
    return int(key_slot(key.encode()))


async def test_the_cluster_client_starts_and_the_limit_holds_across_three_limiters(
    redis_cluster: LocalCluster, clients: list[Any], prefix: str
) -> None:
    settings = _settings(redis_cluster, prefix, rpm=600)
    assert all(isinstance(c, RedisCluster) for c in clients)
    assert await check_redis(clients[0], settings) is True
    # every node found in the slot map writes through the translating connection
    nodes = clients[0].nodes_manager.nodes_cache.values()
    assert len(nodes) >= 3 and all(n.connection_class is SafeConnection for n in nodes)
    limiters = [RateLimiter(settings, c) for c in clients]
    grants = await limit_run(limiters, settings.endpoints[0], 1.4)
    assert not any(lim.degraded for lim in limiters)
    assert max_in_measured_window(grants) <= 10  # 600 rpm: 10/s across the three
    assert len(grants) >= 14
    # every limiter key on the shard of the one tag
    tag_master = redis_cluster.master_of(_slot(shared_tag(prefix)))
    with redis_cluster.node(tag_master) as r:
        assert r.exists(f"{shared_tag(prefix)}:rl:ep:rpm")


async def test_cooldowns_are_shared_and_probed_once(
    redis_cluster: LocalCluster, clients: list[Any], prefix: str
) -> None:
    clock = Clock()
    eps = [EndpointConfig(name="a", url="http://a.test/v1", timeout_seconds=2),
           EndpointConfig(name="b", url="http://b.test/v1", timeout_seconds=2)]
    cfg = RetryConfig(cooldown_seconds=5, cooldown_after_failures=1)
    w1, w2 = (Cooldowns(eps, cfg, c, key_prefix=prefix, clock=clock) for c in clients[:2])
    w1.record_failure("a", rate_limited=True, retry_after=2)
    w1.record_failure("b")
    await w1.sync()  # a script over two keys, and an MGET over four: one slot
    assert await w2.sync() is True
    assert w2.state("a") is EndpointState.COOLING and w2.state("b") is EndpointState.COOLING
    clock.now += 5
    assert await w1.try_probe("a") is True
    assert await w2.try_probe("a") is False
    w1.record_success("a", probe=True)
    await w1.sync()
    await w2.sync()
    assert w2.state("a") is EndpointState.HEALTHY and w2.state("b") is EndpointState.PROBING
    assert not w1.degraded and not w2.degraded


def _req(i: int) -> Request:
    return Request.model_validate({"id": f"r{i}", "model": "m", "input": f"prompt {i}"})


def _comp(i: int) -> Completion:
    body = {"choices": [{"message": {"role": "assistant", "content": f"answer {i}"}}],
            "usage": {}}
    return Completion(model="m", body=body, endpoint="ep", attempts=1)


async def test_cache_keys_spread_and_batched_lookups_hit_across_slots(
    redis_cluster: LocalCluster, clients: list[Any], prefix: str
) -> None:
    settings = _settings(redis_cluster, prefix)
    cache = ResponseCache(settings, clients[0], CollectorRegistry())
    reader = ResponseCache(settings, clients[1], CollectorRegistry())
    n = 300
    reqs = [_req(i) for i in range(n)]
    await asyncio.gather(*(cache.store(r, _comp(i)) for i, r in enumerate(reqs)))
    # the even ones were answered already: their output record is remembered
    await asyncio.gather(*(cache.remember(cache.ref(r, "t"), f"record {i}".encode())
                           for i, r in enumerate(reqs) if i % 2 == 0))
    got = await reader.prefetch(reqs, ["t"] * n)  # one batch: 2n keys over ~2n slots
    assert [p.recalled is not None for p in got] == [i % 2 == 0 for i in range(n)]
    hits = [p.hit.body["choices"][0]["message"]["content"] for p in got if p.hit]
    assert hits == [f"answer {i}" for i in range(1, n, 2)]  # a replay needs no answer
    assert not reader.redis_store.guard.degraded
    # spread: every master holds a fair share of the 2n keys
    for port in redis_cluster.masters():
        with redis_cluster.node(port) as r:
            mine = sum(1 for _ in r.scan_iter(f"{prefix}:*", count=1000))
        assert mine > 2 * n / 6, (port, mine)


async def _move_slot(cluster: LocalCluster, slot: int) -> tuple[int, int]:
    """Migrate ``slot`` (and its keys) to another master, as a resharding does."""
    src = cluster.master_of(slot)
    dst = next(p for p in cluster.masters() if p != src)

    def move() -> None:
        with cluster.node(src) as s, cluster.node(dst) as d:
            src_id, dst_id = s.cluster("myid"), d.cluster("myid")
            d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while keys := s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                s.execute_command("MIGRATE", "127.0.0.1", dst, "", 0, 5000, "KEYS", *keys)
                time.sleep(0.05)  # clients meanwhile meet ASK and TRYAGAIN
            for port in cluster.masters():
                with cluster.node(port) as r:
                    r.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)

    await asyncio.sleep(0.3)
    await asyncio.to_thread(move)
    return src, dst


async def test_a_moved_slot_and_a_planned_failover_are_no_outage(
    redis_cluster: LocalCluster, clients: list[Any], prefix: str
) -> None:
    settings = _settings(redis_cluster, prefix, rpm=600)
    endpoint = settings.endpoints[0]
    limiters = [RateLimiter(settings, c) for c in clients]
    cache = ResponseCache(settings, clients[0], CollectorRegistry())
    slot = _slot(shared_tag(prefix))
    grants: list[float] = []
    # the limiter's slot moves to another master while three limiters use it
    run = asyncio.create_task(limit_run(limiters, endpoint, 2.5, grants))
    src, dst = await _move_slot(redis_cluster, slot)
    await run
    assert redis_cluster.master_of(slot) == dst != src
    assert not any(lim.degraded for lim in limiters), "a MOVED/ASK was taken for an outage"
    grants.sort()
    assert max_in_measured_window(grants) <= 10 and len(grants) >= 24

    # the new master hands over to its replica (CLUSTER FAILOVER), limiter and cache in use
    await cache.store(_req(1), _comp(1))
    replica = redis_cluster.replica_of(dst)
    grants.clear()
    run = asyncio.create_task(limit_run(limiters, endpoint, 2.5, grants))
    await asyncio.sleep(0.3)
    with redis_cluster.node(replica) as r:
        r.execute_command("CLUSTER", "FAILOVER")
    await asyncio.to_thread(redis_cluster.wait_promoted, slot, dst)
    await run
    redis_cluster.wait_ready()
    assert redis_cluster.master_of(slot) == replica
    assert not any(lim.degraded for lim in limiters), "a planned failover was taken for an outage"
    grants.sort()
    assert max_in_measured_window(grants) <= 10 and len(grants) >= 24
    found = await cache.prefetch([_req(1)], ["requests"])
    assert found[0].hit is not None and not cache.redis_store.guard.degraded


async def test_the_wrong_mode_stops_the_worker_at_start(redis_cluster: LocalCluster) -> None:
    single = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
    for url, cluster, message in (
        (single, True, "is not a Redis Cluster .*set redis.cluster: false"),
        (redis_cluster.url, False, "is a Redis Cluster node: set redis.cluster: true"),
    ):
        settings = load_settings(environ={}, redis={"url": url, "cluster": cluster})
        client = open_redis(settings)
        try:
            with pytest.raises(StartupError, match=message):
                await check_redis(client, settings)
        finally:
            await client.aclose()


def _free_port_above(low: int) -> int:
    for port in range(low + 1, 61000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port above {low}")


def test_a_private_cluster_node_starts_on_a_port_whose_bus_would_pass_65535(
        tmp_path: Path) -> None:
    """Linux hands out free ports up to 60999; redis-server's default bus (port + 10000) makes
    it exit for any above 55535, which failed a CI run. The harness gives the bus its own port."""
    node = PrivateRedis(tmp_path, port=_free_port_above(55535),
                        extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
    node.start()
    try:
        with redis.Redis(port=node.port) as r:
            assert r.cluster("info")["cluster_state"] in ("ok", "fail")
    finally:
        node.stop()


async def test_a_wrong_password_on_a_cluster_is_one_line(tmp_path: Path) -> None:
    """A one-node cluster with requirepass (all slots on it)."""
    password = "cluster-secret-7"
    node = PrivateRedis(tmp_path, password=password,
                        extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
    node.start()
    try:
        with redis.Redis(port=node.port, password=password) as r:
            r.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            while r.cluster("info")["cluster_state"] != "ok":
                await asyncio.sleep(0.1)
        for given, ok in ((password, True), ("wrong-one-9", False)):
            settings = load_settings(environ={"RP": given}, redis={
                "url": f"redis://127.0.0.1:{node.port}/0", "cluster": True, "password_env": "RP"})
            client = open_redis(settings)
            try:
                if ok:
                    assert await check_redis(client, settings) is True
                    continue
                with pytest.raises(StartupError, match="authentication failed for user default"
                                   ) as info:
                    await check_redis(client, settings)
                assert given not in str(info.value) and password not in str(info.value)
            finally:
                await client.aclose()
    finally:
        node.stop()

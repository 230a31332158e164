"""Redis Cluster: the cluster client, and cache reads grouped per slot and pipelined per node.

With ``redis.cluster: true`` every user of Redis gets redis-py's cluster client
(``redis.asyncio.cluster.RedisCluster``) instead of the single-server one. It discovers the
cluster from ``redis.url``'s node (and ``redis.cluster_nodes``), follows MOVED and ASK
redirections itself, and after a connection error or CLUSTERDOWN re-reads the slot map and
retries: a resharding or a planned failover (``CLUSTER FAILOVER``) never reaches the Redis
guard. Only when the client gives up (a killed master before its replica is promoted) does the
guard see an outage, and only for the user whose command failed: the rate limiter falls back
to its local share of the limits, the cache is bypassed for ``cache.redis_retry_seconds``.

Which key lives where is decided in ``streams/cache/keys.py`` ("Hash tags"): the limiter's and
the cooldowns' keys share one tag (one shard), cache, idempotency and lock keys spread.
``MGET`` needs all its keys in one slot, so a batch of cache reads is split per slot here and
the per-slot ``MGET``s go out in one cluster pipeline (one round trip per node).

Usage::

    client = open_cluster(settings)           # nothing connects before the first command
    values = await mget_by_slot(client, keys)  # in the order of keys
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlsplit

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from streams.config import Settings, cluster_node
from streams.redis_conn import safe_connection_class

# Attempts after the first on a connection error, CLUSTERDOWN or an uncovered slot: each
# re-reads the slot map first, so a promoted replica is found as soon as the cluster knows it.
CLUSTER_RETRIES = 3


def open_cluster(settings: Settings) -> RedisCluster:
    """A cluster client on ``redis.url`` (plus ``redis.cluster_nodes``); lazy, like ``open_redis``.

    ``redis.max_connections`` bounds the connections to each node.
    """
    r = settings.redis
    extra: dict[str, Any] = {}
    if r.ssl_cafile:
        extra["ssl_ca_certs"] = r.ssl_cafile
    if r.username:
        extra["username"] = r.username
    if r.password is not None:
        extra["password"] = r.password.get_secret_value()
    nodes = [ClusterNode(*hp) for n in r.cluster_nodes if (hp := cluster_node(n)) is not None]
    url = r.url.get_secret_value()
    if not urlsplit(url).port:  # redis-py's cluster client has no default port of its own
        extra["port"] = 6379
    client = RedisCluster.from_url(
        url,
        startup_nodes=nodes or None,
        max_connections=r.max_connections,
        socket_timeout=r.socket_timeout_seconds,
        socket_connect_timeout=r.socket_timeout_seconds,
        retry=Retry(NoBackoff(), CLUSTER_RETRIES),
        **extra,
    )
    # redis-py fixes the connection class; every node made later takes it from these kwargs
    safe = safe_connection_class(client.connection_kwargs["connection_class"])
    client.connection_kwargs["connection_class"] = safe
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_class = safe
    return client


def is_cluster(client: object) -> bool:
    """Is ``client`` a Redis Cluster client?"""
    return isinstance(client, RedisCluster)


async def mget_by_slot(client: RedisCluster, keys: list[str]) -> list[bytes | None]:
    """``MGET`` of keys in any slots: one ``MGET`` per slot, all in one cluster pipeline
    (which sends each node its share in one round trip). Values in the order of ``keys``;
    a failed slot raises, as one ``MGET`` would."""
    by_slot: dict[int, list[str]] = {}
    for key in keys:
        by_slot.setdefault(client.keyslot(key), []).append(key)
    pipe = client.pipeline()
    for group in by_slot.values():
        pipe.execute_command("MGET", *group)  # (pipe.mget is refused: it could span slots)
    replies = cast(list[list[bytes | None]], await pipe.execute())
    found: dict[str, bytes | None] = {}
    for group, values in zip(by_slot.values(), replies, strict=True):
        found.update(zip(group, values, strict=True))
    return [found[k] for k in keys]


def shared_tag(prefix: str) -> str:
    """The hash tag of the keys checked together in one script (limits, cooldowns): ``{prefix}``.

    See "Hash tags" in ``streams/cache/keys.py``.
    """
    return f"{{{prefix}}}"

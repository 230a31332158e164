"""Redis Cluster mode: its config keys, its client, its errors, and where the keys live."""

from __future__ import annotations

import string
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis._parsers.base import BaseParser
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterCrossSlotError,
    MaxConnectionsError,
    MovedError,
    RedisClusterException,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from streams.config import EndpointConfig, Settings, cluster_node, load_settings
from streams.dispatch.cooldown import Cooldowns
from streams.dispatch.ratelimit import RateLimiter
from streams.errors import ConfigError, StartupError
from streams.redis_conn import SafeConnection, SafeSSLConnection, SafeUnixConnection
from streams.redis_guard import REDIS_ERRORS, is_outage
from streams.redis_io import check_redis, open_redis

URL = "redis://127.0.0.1:7000/0"


def _load(**redis: Any) -> Settings:
    return load_settings(environ={"RP": "pw-from-env"}, redis=redis)


def test_cluster_mode_loads_with_startup_nodes() -> None:
    s = _load(url=URL, cluster=True, cluster_nodes=["10.0.0.2:7001", "redis-3:7002", "[::1]:7003"])
    assert s.redis.cluster and len(s.redis.cluster_nodes) == 3
    assert not load_settings(environ={}).redis.cluster  # off by default
    for url in ("redis://h:7000", "redis://h:7000/", "rediss://u:p@h:7000/0"):
        assert _load(url=url, cluster=True).redis.cluster


@pytest.mark.parametrize(("redis", "message"), [
    ({"url": "unix:///run/redis.sock", "cluster": True}, "cluster needs a redis:// or rediss://"),
    ({"url": "redis://h:7000/3", "cluster": True}, "cluster needs database 0"),
    ({"url": URL, "cluster": True, "key_prefix": "a{b}"}, "key_prefix must not contain"),
    ({"url": URL, "cluster_nodes": ["h:7001"]}, "cluster_nodes needs cluster: true"),
    ({"url": URL, "cluster": True, "cluster_nodes": ["h"]}, "redis.cluster_nodes: .*host:port"),
    ({"url": URL, "cluster": True, "cluster_nodes": ["h:0"]}, "host:port"),
    ({"url": URL, "cluster": True, "cluster_nodes": ["h:65536"]}, "host:port"),
])
def test_cluster_config_errors_name_the_key(redis: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(**redis)


def test_braces_in_the_prefix_stay_allowed_on_a_single_server() -> None:
    assert _load(url=URL, key_prefix="a{b}").redis.key_prefix == "a{b}"  # nothing changes there


_HOSTS = st.one_of(
    st.text(string.ascii_letters + string.digits + ".-", min_size=1, max_size=40),
    st.ip_addresses(v=4).map(str),
)


@given(_HOSTS, st.integers(1, 65535))
def test_any_host_and_port_is_a_node(host: str, port: int) -> None:
    assert cluster_node(f"{host}:{port}") == (host, port)
    assert cluster_node(f"[{host}]:{port}") == (host, port)


@given(st.text(max_size=60))
def test_a_node_is_parsed_or_refused_never_a_crash(text: str) -> None:
    node = cluster_node(text)
    if node is not None:
        host, port = node
        assert 0 < port < 65536 and host and text.endswith(f":{port}")
        assert "@" not in host and "/" not in host


@given(st.text(string.ascii_letters + string.digits + "!#%&*+=?^~", min_size=8, max_size=30))
def test_a_bad_node_entry_never_echoes_what_it_holds(secret: str) -> None:
    for entry in (f"redis://admin:{secret}@h:7001", f"admin:{secret}@h:7001", f"{secret} h:7001"):
        with pytest.raises(ConfigError) as info:
            _load(url=URL, cluster=True, cluster_nodes=["h:7000", entry])
        assert "redis.cluster_nodes" in str(info.value) and secret not in str(info.value)


async def test_the_cluster_client_takes_the_settings_without_connecting() -> None:
    s = _load(url="redis://app@10.0.0.1:7000/0", cluster=True, password_env="RP",
              cluster_nodes=["10.0.0.2:7001"], max_connections=7, socket_timeout_seconds=0.5)
    client = open_redis(s)
    try:
        assert isinstance(client, RedisCluster)
        kw = client.get_connection_kwargs()
        assert (kw["password"], kw["username"]) == ("pw-from-env", "app")
        assert kw["socket_timeout"] == 0.5 and kw["max_connections"] == 7
        nodes = {n.name for n in client.nodes_manager.startup_nodes.values()}
        assert nodes == {"10.0.0.1:7000", "10.0.0.2:7001"}
        assert client.retry.get_retries() >= 1
    finally:
        await client.aclose()


def test_cluster_errors() -> None:
    # a redirection the client could not resolve: the slot map is in flux
    assert is_outage(MovedError("3999 127.0.0.1:7001")) and is_outage(AskError("1 h:7001"))
    assert is_outage(BaseParser.parse_error("MOVED 3999 127.0.0.1:7001"))
    # no node could be reached: not a RedisError, but caught and an outage
    exc = RedisClusterException("Redis Cluster cannot be connected")
    assert isinstance(exc, REDIS_ERRORS) and is_outage(exc)
    # a full per-node pool fails that command only
    assert not is_outage(MaxConnectionsError("Too many connections"))
    assert not is_outage(ClusterCrossSlotError("CROSSSLOT Keys don't hash to the same slot"))


class _Recorder:
    """Records the keys each script and multi-key command is given."""

    def __init__(self) -> None:
        self.key_sets: list[list[str]] = []

    async def evalsha(self, sha: str, n: int, *args: Any) -> Any:
        self.key_sets.append([str(a) for a in args[:n]])
        return [1, "0", 0]

    async def eval(self, src: str, n: int, *args: Any) -> Any:
        self.key_sets.append([str(a) for a in args[:n]])
        return "0"

    async def mget(self, keys: list[str]) -> list[None]:
        self.key_sets.append(list(keys))
        return [None] * len(keys)

    async def delete(self, *keys: str) -> int:
        self.key_sets.append(list(keys))
        return 0


@pytest.mark.parametrize("prefix", ["llmstreams", "a:b", "x"])
async def test_keys_checked_together_share_one_slot(prefix: str) -> None:
    eps = [EndpointConfig(name=n, url=f"http://{n}.test/v1", rpm=60, tpm=1000, max_concurrency=4)
           for n in ("a", "b", "c")]
    s = load_settings(environ={}, endpoints=eps, limits={"max_requests_per_second": 10},
                      redis={"key_prefix": prefix})
    rec = _Recorder()
    limiter = RateLimiter(s, rec)
    cooldowns = Cooldowns(s.endpoints, s.retry, rec, key_prefix=prefix)
    for ep in s.endpoints:
        await limiter.acquire(ep, 10)
        cooldowns.record_failure(ep.name, rate_limited=True, retry_after=1.0)
    await cooldowns.sync()
    keys = [k for ks in rec.key_sets for k in ks]
    assert len(keys) >= 4 * 3 + 6
    # one slot for them all: the limiter's and the cooldowns' shard
    assert {key_slot(k.encode()) for k in keys} == {key_slot(prefix.encode())}


class _Refusing:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def ping(self) -> bool:
        raise self.exc


def _wrapped(cause: BaseException) -> RedisClusterException:
    """What the cluster client raises when no startup node let it in."""
    exc = RedisClusterException(f"Redis Cluster cannot be connected. Please provide at least "
                                f"one reachable node: {cause}")
    exc.__cause__ = cause
    return exc


async def test_start_errors_wrapped_by_the_cluster_client() -> None:
    s = _load(url=URL, cluster=True, password_env="RP")
    auth = _wrapped(AuthenticationError("invalid username-password pair"))
    with pytest.raises(StartupError, match="authentication failed for user default at "
                                           "127.0.0.1:7000$"):
        await check_redis(_Refusing(auth), s)  # type: ignore[arg-type]
    single = _wrapped(RedisClusterException("Cluster mode is not enabled on this node"))
    with pytest.raises(StartupError, match="not a Redis Cluster"):
        await check_redis(_Refusing(single), s)  # type: ignore[arg-type]
    down = _wrapped(RedisConnectionError("Connection refused"))
    assert await check_redis(_Refusing(down), s) is False  # only logged: it may come


class _ClosedWriter:
    """A stream writer over a transport that is already closed, as uvloop reports it."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.closed = False

    def writelines(self, data: Any) -> None:
        raise self.exc

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        return None

    async def drain(self) -> None:
        return None


@pytest.mark.parametrize("exc", [
    RuntimeError("unable to perform operation on <TCPTransport closed=True reading=False "
                 "0x55d956ba1190>; the handler is closed"),  # uvloop
    TypeError("'NoneType' object is not callable"),  # asyncio, CPython 3.12
    AttributeError("'NoneType' object has no attribute '_add_writer'"),  # 3.13
])
async def test_a_write_on_a_closed_transport_is_a_connection_error(exc: BaseException) -> None:
    conn = SafeConnection(host="127.0.0.1", port=1, socket_timeout=None)
    writer = _ClosedWriter(exc)
    conn._reader, conn._writer = object(), writer  # type: ignore[assignment]
    with pytest.raises(RedisConnectionError, match="connection closed while writing") as info:
        await conn.send_packed_command([b"*1\r\n$4\r\nPING\r\n"], check_health=False)
    assert info.value.__cause__ is exc and is_outage(info.value)
    assert writer.closed and not conn.is_connected  # redis-py dropped it: the next reconnects


@pytest.mark.parametrize("url", ["redis://h:1/0", "rediss://h:1/0", "unix:///run/r.sock"])
async def test_every_client_uses_the_translating_connections(url: str) -> None:
    for s in [_load(url=url)] + ([] if url.startswith("unix") else [_load(url=url, cluster=True)]):
        client = open_redis(s)
        try:
            if isinstance(client, RedisCluster):
                classes = [client.connection_kwargs["connection_class"]] + [
                    n.connection_class for n in client.nodes_manager.startup_nodes.values()]
            else:
                classes = [client.connection_pool.connection_class]
            assert all(c in (SafeConnection, SafeSSLConnection, SafeUnixConnection)
                       for c in classes), classes
        finally:
            await client.aclose()

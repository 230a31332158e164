"""The ``kafka:``, ``topics:`` and ``redis:`` sections of the settings: where the worker connects.

Validated here (SASL completeness, Redis URLs and cluster nodes); the passwords themselves are
read from the environment by ``config.py``'s loader, never from the file.

Usage::

    settings.kafka.codec, settings.topics.parked_topic, settings.redis.user
    cluster_node("10.0.0.2:7001")   # ("10.0.0.2", 7001)
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from streams.config_sections import Section, env_name

# A host name or an IPv4/IPv6 address: no scheme, no user or password, no path.
_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}|[0-9A-Fa-f:.]{2,45}")
_PORT = re.compile(r"[0-9]{1,5}")


class KafkaConfig(Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "llm-streams"
    partitions: int = Field(4, ge=1, le=10_000)
    replication_factor: int = Field(1, ge=1)
    client_id: str = "llm-streams"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password_env: str | None = None
    sasl_password: SecretStr | None = Field(None, exclude=True)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    session_timeout_seconds: float = Field(30.0, gt=0)
    commit_interval_seconds: float = Field(1.0, gt=0)
    # Our outputs (responses, dead letters, replays, batch requests); any codec is read.
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    # read_committed: records of a transaction its producer aborted are never answered.
    isolation_level: Literal["read_committed", "read_uncommitted"] = "read_committed"
    # Each commit names the offsets finished above it, in at most this many characters (the
    # broker's offset.metadata.max.bytes, 4096 by default); 0: commits carry no metadata.
    commit_metadata_max_bytes: int = Field(4096, ge=0, le=1_048_576)

    _env_name = field_validator("sasl_password_env")(env_name)

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaConfig:
        if self.security_protocol.startswith("SASL"):
            if not self.sasl_username:
                raise ValueError(f"sasl_username is required with {self.security_protocol}")
            if not self.sasl_password_env:
                raise ValueError(f"sasl_password_env is required with {self.security_protocol}")
        return self

    @property
    def mechanism(self) -> str:
        """The SASL mechanism in use (PLAIN when SASL is on and none is named)."""
        return self.sasl_mechanism or "PLAIN"

    @property
    def codec(self) -> str | None:
        """``compression_type`` as aiokafka takes it (None: uncompressed)."""
        return None if self.compression_type == "none" else self.compression_type


class TopicsConfig(Section):
    requests: str = "llm.requests"
    responses: str = "llm.responses"
    dead_letter: str = "llm.requests.dlq"
    # Work that can wait (batch_api): requests waiting for a Batch API job (default
    # "<requests>.parked"), and the jobs' state (compacted; default "<requests>.batch-jobs").
    parked: str | None = None
    batch_jobs: str | None = None

    @property
    def parked_topic(self) -> str:
        return self.parked or f"{self.requests}.parked"

    @property
    def batch_jobs_topic(self) -> str:
        return self.batch_jobs or f"{self.requests}.batch-jobs"


class RedisConfig(Section):
    # A secret as a whole: the URL may hold a password (redis://user:password@host:port/db).
    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    username: str | None = None  # ACL user; or in the URL
    password_env: str | None = None  # env var holding the password; or in the URL
    password: SecretStr | None = Field(None, exclude=True)
    ssl_cafile: str | None = None  # CA bundle for rediss:// (default: the system's)
    key_prefix: str = "llmstreams"
    socket_timeout_seconds: float = Field(1.0, gt=0)
    max_connections: int = Field(128, ge=1)
    # Redis Cluster: the URL names one node (host, port, credentials, TLS); cluster_nodes
    # adds more nodes to discover the cluster from ("host:port"), should that one be down.
    cluster: bool = False
    cluster_nodes: list[str] = Field(default_factory=list, max_length=100)

    _env_name = field_validator("password_env")(env_name)

    @field_validator("cluster_nodes")
    @classmethod
    def _cluster_nodes(cls, value: list[str]) -> list[str]:
        for i, node in enumerate(value):
            if cluster_node(node) is None:  # the value is never echoed: it may hold a password
                raise ValueError(f"entry {i} must be host:port (a node of the cluster; "
                                 "credentials and TLS come from redis.url)")
        return value

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: SecretStr) -> SecretStr:
        try:
            parts = urlsplit(value.get_secret_value())
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError("is not a valid URL") from None
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// (TLS) or unix://")
        return value

    @model_validator(mode="after")
    def _one_source_each(self) -> RedisConfig:
        parts = urlsplit(self.url.get_secret_value())
        if parts.password and self.password_env:
            raise ValueError("give the password in the url or in password_env, not both")
        if parts.username and self.username:
            raise ValueError("give the username in the url or in username, not both")
        if self.ssl_cafile and parts.scheme != "rediss":
            raise ValueError("ssl_cafile needs a rediss:// url")
        if self.cluster:
            self._cluster_ok(parts.scheme, parts.path)
        elif self.cluster_nodes:
            raise ValueError("cluster_nodes needs cluster: true")
        return self

    def _cluster_ok(self, scheme: str, path: str) -> None:
        if scheme == "unix":
            raise ValueError("cluster needs a redis:// or rediss:// url (a node's host:port)")
        if path.strip("/") not in ("", "0"):
            raise ValueError("cluster needs database 0 in the url (Redis Cluster has one)")
        # keys.py wraps the prefix in a hash tag: braces in it would move the tag
        if "{" in self.key_prefix or "}" in self.key_prefix:
            raise ValueError("key_prefix must not contain { or } with cluster: true")

    @property
    def user(self) -> str:
        """The ACL user we log in as (Redis calls the password-only login "default")."""
        url_user = urlsplit(self.url.get_secret_value()).username
        return unquote(url_user) if url_user else self.username or "default"


def cluster_node(text: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``host:port`` (``[v6]:port``) cluster node, or None if it is not one."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not (sep and _PORT.fullmatch(port) and 0 < int(port) < 65536 and _HOST.fullmatch(host)):
        return None
    return host, int(port)

"""One validated settings object, loaded once at the edge (the CLI) and passed down.

Sources, highest priority first: environment variables ``LLM_STREAMS__SECTION__KEY``
(``LLM_STREAMS__ENDPOINTS`` takes a JSON list), then the YAML file, then the defaults here.
Nothing else in the package reads ``os.environ``: API keys are resolved here from each
endpoint's ``api_key_env`` into a ``SecretStr``.

Usage::

    settings = load_settings("config/default.yaml")
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from streams.config_errors import format_error, yaml_problem
from streams.config_tenants import PriceConfig, TenantConfig
from streams.errors import ConfigError
from streams.pipelines.settings import PipelineConfig, check_pipelines
from streams.redact import url_secrets

ENV_PREFIX = "LLM_STREAMS__"

# An env var name as shells write them; a name is echoed in errors only when it has this
# conventional upper-case form (a password pasted into ``*_env`` by mistake stays unprinted).
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_SHOWN_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
# A host name or an IPv4/IPv6 address: no scheme, no user or password, no path.
_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}|[0-9A-Fa-f:.]{2,45}")
_PORT = re.compile(r"[0-9]{1,5}")


def env_name(value: str | None) -> str | None:
    """A validator for ``*_env`` keys: a shell variable name; the value is never echoed."""
    if value is not None and not _ENV_NAME.fullmatch(value):
        raise ValueError("is not an environment variable name (letters, digits and _)")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def _at_least(self, key: str, floor: str) -> Self:
        """For a validator: this section, if its ``key`` is at least its ``floor`` key."""
        if getattr(self, key) < getattr(self, floor):
            raise ValueError(f"{key} must be at least {floor}")
        return self


class KafkaConfig(_Section):
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


class TopicsConfig(_Section):
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


class RedisConfig(_Section):
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


class NormalizeConfig(_Section):
    whitespace: bool = True
    case_fold: bool = False


class CacheConfig(_Section):
    enabled: bool = True
    ttl_seconds: int = Field(86_400, ge=1)
    # The largest cache.ttl a request may ask for; a larger one is a validation dead letter.
    max_ttl_seconds: int = Field(30 * 86_400, ge=1, le=10 * 365 * 86_400)
    normalize: NormalizeConfig = NormalizeConfig()
    max_value_bytes: int = Field(1_048_576, ge=1)
    compress_min_bytes: int = Field(2_048, ge=0)
    idempotency_ttl_seconds: int = Field(7 * 86_400, ge=1)
    # A no_store answer is kept only while its record can still be redelivered (see README).
    no_store_idempotency_ttl_seconds: int = Field(900, ge=1)
    coalesce_wait_seconds: float = Field(120.0, gt=0)
    coalesce_lock_seconds: float = Field(10.0, gt=0)
    coalesce_poll_seconds: float = Field(0.05, gt=0)
    batch_max_keys: int = Field(256, ge=1)
    redis_retry_seconds: float = Field(1.0, ge=0)
    error_log_interval_seconds: float = Field(10.0, ge=0)
    # Tries of a Redis call that decides whether the upstream is paid (idempotency reads and
    # writes, coalesced answers' writes) after an outage error, sleeping redis_backoff_seconds, doubled.
    redis_attempts: int = Field(3, ge=1, le=10)
    redis_backoff_seconds: float = Field(0.1, ge=0, le=10)


class LimitsConfig(_Section):
    max_inflight: int = Field(2_000, ge=1)
    # Records one worker tracks for its acks: in flight, queued, and finished but waiting for
    # an earlier offset of their partition. At the cap the worker stops taking records and
    # faust pauses the partitions. Room for read-ahead (priority, fair share) beyond max_inflight.
    max_tracked: int = Field(60_000, ge=1)
    max_requests_per_second: float | None = Field(None, gt=0)
    max_value_bytes: int = Field(1_048_576, ge=1)
    priority_aging_ms: int = Field(10_000, ge=0)
    # GCRA burst for rpm and max_requests_per_second: how many requests may go at once.
    rate_burst: int = Field(1, ge=1)
    # Share of each limit one worker uses while Redis is unreachable (1 / number of workers
    # keeps the group within the limit; 1.0 lets every worker use the whole limit).
    local_fallback_fraction: float = Field(1.0, gt=0, le=1)
    # Read-ahead: records held waiting (rate limits, budgets, fair share) on top of the
    # max_inflight calls in flight; bounded by max_tracked too.
    max_queued: int = Field(50_000, ge=0)

    @model_validator(mode="after")
    def _tracked_covers_inflight(self) -> LimitsConfig:
        return self._at_least("max_tracked", "max_inflight")


class RetryConfig(_Section):
    max_attempts: int = Field(4, ge=1, le=100)
    base_delay_ms: int = Field(200, ge=0)
    max_delay_ms: int = Field(20_000, ge=0)
    max_retry_after_ms: int = Field(60_000, ge=0)
    cooldown_seconds: float = Field(5.0, gt=0)
    cooldown_after_failures: int = Field(3, ge=1)


class EndpointConfig(_Section):
    name: str = Field(min_length=1)
    # {url}/chat/completions is called: .../v1 for OpenAI, vLLM, Ollama; the deployment URL
    # .../openai/deployments/{deployment} for Azure OpenAI.
    url: str = Field(min_length=1)
    api_key_env: str | None = None
    api_key: SecretStr | None = Field(None, exclude=True)
    # "Authorization" sends "Bearer {key}"; any other header (Azure: api-key) the bare key.
    api_key_header: str = Field("Authorization", min_length=1)
    api_version: str | None = None  # sent as ?api-version= (Azure OpenAI)
    weight: float = Field(1.0, ge=0)
    models: list[str] | None = None
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_concurrency: int | None = Field(None, ge=1)
    timeout_seconds: float = Field(60.0, gt=0)
    # A longer answer is not read (dead letter "upstream"): bounds the memory of one call,
    # far above any chat completion (a response record over Kafka's 1 MiB fails anyway).
    max_response_bytes: int = Field(8 * 1_048_576, ge=1_024)
    # Takes response_format json_schema (OpenAI, Azure, vLLM, Ollama); false: the schema of a
    # pipeline's structured output is sent as an instruction instead.
    structured_outputs: bool = True
    # Offers /files and /batches (OpenAI and Azure OpenAI style): used for work that can wait.
    batch_api: bool = False

    _env_name = field_validator("api_key_env")(env_name)

    @field_validator("url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) base URL (to which /chat/completions is added)")
        if "?" in value:
            raise ValueError("must not have a query; use api_version for ?api-version=")
        return value.rstrip("/")

    def serves(self, model: str) -> bool:
        return self.models is None or model in self.models


class EmbeddingsConfig(_Section):
    """How embedding requests are batched into one ``/embeddings`` call (``dispatch/embeddings.py``)."""

    max_batch_inputs: int = Field(256, ge=1, le=2_048)
    max_batch_tokens: int = Field(100_000, ge=1)
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)


class MetricsConfig(_Section):
    port: int = Field(9300, ge=0, le=65_535)
    host: str = "127.0.0.1"


class WorkerConfig(_Section):
    default_model: str = "gpt-4o-mini"
    shutdown_grace_seconds: float = Field(20.0, ge=0)
    dlq_raw_limit_bytes: int = Field(65_536, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    gc_threshold: int | None = Field(100_000, ge=700)
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"


class BatchApiConfig(_Section):
    """Work that can wait: which requests go through provider Batch APIs (README)."""

    enabled: bool = False
    min_priority: int = Field(7, ge=0, le=9)  # priority 7-9 qualify by default
    # The deadline must be at least this far (or absent) for a request to qualify.
    min_slack_seconds: float = Field(3_600.0, ge=0)
    max_requests_per_job: int = Field(50_000, ge=1, le=50_000)
    max_wait_seconds: float = Field(300.0, ge=0)  # longest a request waits for its job to fill
    poll_seconds: float = Field(30.0, gt=0)
    fallback_slack_seconds: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _slack_order(self) -> BatchApiConfig:
        return self._at_least("min_slack_seconds", "fallback_slack_seconds")


class Settings(BaseSettings):
    """The whole configuration; see config/default.yaml for every key with a comment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    kafka: KafkaConfig = KafkaConfig()
    topics: TopicsConfig = TopicsConfig()
    redis: RedisConfig = RedisConfig()
    cache: CacheConfig = CacheConfig()
    limits: LimitsConfig = LimitsConfig()
    retry: RetryConfig = RetryConfig()
    endpoints: list[EndpointConfig] = [
        EndpointConfig(name="mock-a", url="http://127.0.0.1:8001/v1")
    ]
    metrics: MetricsConfig = MetricsConfig()
    worker: WorkerConfig = WorkerConfig()
    pricing: dict[str, PriceConfig] = {}
    tenants: dict[str, TenantConfig] = {}
    pipelines: list[PipelineConfig] = []  # streams/pipelines/settings.py
    embeddings: EmbeddingsConfig = EmbeddingsConfig()
    batch_api: BatchApiConfig = BatchApiConfig()

    @field_validator("endpoints")
    @classmethod
    def _unique_names(cls, value: list[EndpointConfig]) -> list[EndpointConfig]:
        if not value:
            raise ValueError("at least one endpoint is required")
        names = [e.name for e in value]
        if len(set(names)) != len(names):
            raise ValueError("endpoint names must be unique")
        return value

    @model_validator(mode="after")
    def _pipelines_fit(self) -> Settings:
        check_pipelines(self.pipelines, {e.name: e.models for e in self.endpoints},
                        self.topics.requests)
        return self

    def secret_values(self) -> list[str]:
        """Every secret in the settings (keys, passwords), for redaction."""
        found = [e.api_key for e in self.endpoints]
        found += [self.kafka.sasl_password, self.redis.password]
        values = [s.get_secret_value() for s in found if s is not None]
        values += url_secrets(self.redis.url.get_secret_value())
        values += [v for e in self.endpoints for v in url_secrets(e.url)]
        return [v for v in values if v]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the YAML file (passed as init kwargs).
        return (env_settings, init_settings)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML{yaml_problem(exc)}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"config file {path} must hold a mapping of sections by name")
    return data


def _resolve_secrets(settings: Settings, environ: Mapping[str, str]) -> Settings:
    def secret(given: SecretStr | None, env_name: str | None, what: str) -> SecretStr | None:
        if given is not None:  # a secret written in the file or a variable would be lost
            raise ConfigError(f"invalid config key {what.removesuffix('_env')}: secrets are read "
                              f"from the environment; name the variable in {what}")
        if env_name is None:
            return None
        value = environ.get(env_name)
        if value is None:
            shown = env_name if _SHOWN_ENV_NAME.fullmatch(env_name) else "named there"
            raise ConfigError(f"invalid config key {what}: environment variable {shown} is not set")
        return SecretStr(value)

    k, r = settings.kafka, settings.redis
    endpoints = [
        e.model_copy(update={"api_key": secret(e.api_key, e.api_key_env,
                                               f"endpoints.{e.name}.api_key_env")})
        for e in settings.endpoints
    ]
    kafka = k.model_copy(update={"sasl_password": secret(k.sasl_password, k.sasl_password_env,
                                                         "kafka.sasl_password_env")})
    redis = r.model_copy(update={"password": secret(r.password, r.password_env,
                                                    "redis.password_env")})
    return settings.model_copy(update={"endpoints": endpoints, "kafka": kafka, "redis": redis})


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Load YAML (if given), apply env overrides and keyword overrides, resolve secrets.

    Raises ConfigError with one line naming the offending key.
    """
    data = _read_yaml(Path(path)) if path is not None else {}
    data.update(overrides)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(format_error(exc, [data, dict(os.environ), dict(environ or {})])
                          ) from None
    except SettingsError as exc:  # names the field and the source, never the value
        raise ConfigError(f"invalid config from the environment: {exc} (sections and "
                          "lists are given as JSON)") from None
    return _resolve_secrets(settings, os.environ if environ is None else environ)

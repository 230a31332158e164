"""The worker's behaviour sections: cache, limits, retry, endpoints, embeddings, metrics, worker, batch_api.

Validated here, loaded by ``config.py``. Also the base every section here and in
``config_connections.py`` shares (``Section``: no unknown keys, frozen) and ``env_name``, the
validator of ``*_env`` keys.

Usage::

    settings.limits.max_inflight, settings.endpoints[0].serves("gpt-4o-mini")
"""

from __future__ import annotations

import re
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

# An env var name as shells write them.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


def env_name(value: str | None) -> str | None:
    """A validator for ``*_env`` keys: a shell variable name; the value is never echoed."""
    if value is not None and not _ENV_NAME.fullmatch(value):
        raise ValueError("is not an environment variable name (letters, digits and _)")
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def _at_least(self, key: str, floor: str) -> Self:
        """For a validator: this section, if its ``key`` is at least its ``floor`` key."""
        if getattr(self, key) < getattr(self, floor):
            raise ValueError(f"{key} must be at least {floor}")
        return self


class NormalizeConfig(Section):
    whitespace: bool = True
    case_fold: bool = False


class CacheConfig(Section):
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


class LimitsConfig(Section):
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


class RetryConfig(Section):
    max_attempts: int = Field(4, ge=1, le=100)
    base_delay_ms: int = Field(200, ge=0)
    max_delay_ms: int = Field(20_000, ge=0)
    max_retry_after_ms: int = Field(60_000, ge=0)
    cooldown_seconds: float = Field(5.0, gt=0)
    cooldown_after_failures: int = Field(3, ge=1)


class EndpointConfig(Section):
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


class EmbeddingsConfig(Section):
    """How embedding requests are batched into one ``/embeddings`` call (``dispatch/embeddings.py``)."""

    max_batch_inputs: int = Field(256, ge=1, le=2_048)
    max_batch_tokens: int = Field(100_000, ge=1)
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)


class MetricsConfig(Section):
    port: int = Field(9300, ge=0, le=65_535)
    host: str = "127.0.0.1"


class WorkerConfig(Section):
    default_model: str = "gpt-4o-mini"
    shutdown_grace_seconds: float = Field(20.0, ge=0)
    dlq_raw_limit_bytes: int = Field(65_536, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    gc_threshold: int | None = Field(100_000, ge=700)
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"


class BatchApiConfig(Section):
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

"""The whole settings object (``Settings``) and its loading: YAML file, environment overrides, secrets.

Sources, highest priority first: environment variables ``LLM_STREAMS__SECTION__KEY``
(``LLM_STREAMS__ENDPOINTS`` takes a JSON list), then the YAML file, then the defaults of each
section. Nothing else in the package reads ``os.environ``: API keys are resolved here from each
endpoint's ``api_key_env`` into a ``SecretStr``. The sections live in ``config_connections.py``
(kafka, topics, redis), ``config_sections.py`` (the rest), ``config_tenants.py`` (pricing,
tenants) and ``pipelines/settings.py`` (pipelines); their names are importable from here.

Usage::

    settings = load_settings("config/default.yaml")
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from streams.config_connections import KafkaConfig, RedisConfig, TopicsConfig, cluster_node
from streams.config_errors import format_error, yaml_problem
from streams.config_sections import (
    BatchApiConfig,
    CacheConfig,
    EmbeddingsConfig,
    EndpointConfig,
    LimitsConfig,
    MetricsConfig,
    NormalizeConfig,
    RetryConfig,
    WorkerConfig,
    env_name,
)
from streams.config_tenants import PriceConfig, TenantConfig
from streams.errors import ConfigError
from streams.pipelines.settings import PipelineConfig, check_pipelines
from streams.redact import url_secrets

__all__ = [
    "ENV_PREFIX", "BatchApiConfig", "CacheConfig", "EmbeddingsConfig", "EndpointConfig",
    "KafkaConfig", "LimitsConfig", "MetricsConfig", "NormalizeConfig", "PipelineConfig",
    "PriceConfig", "RedisConfig", "RetryConfig", "Settings", "TenantConfig", "TopicsConfig",
    "WorkerConfig", "cluster_node", "env_name", "load_settings",
]

ENV_PREFIX = "LLM_STREAMS__"

# A name is echoed in errors only when it has the conventional upper-case form (a password
# pasted into ``*_env`` by mistake stays unprinted).
_SHOWN_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


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

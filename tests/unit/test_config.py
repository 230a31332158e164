from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from streams.config import EndpointConfig, Settings, load_settings
from streams.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_default_config_loads() -> None:
    s = load_settings(ROOT / "config" / "default.yaml", environ={})
    assert s.topics.requests == "llm.requests"
    assert s.topics.responses == "llm.responses"
    assert s.topics.dead_letter == "llm.requests.dlq"
    assert [e.name for e in s.endpoints] == ["mock-a", "mock-b"]


def test_env_overrides_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kafka:\n  group_id: from-file\n  partitions: 8\n")
    monkeypatch.setenv("LLM_STREAMS__KAFKA__GROUP_ID", "from-env")
    monkeypatch.setenv("LLM_STREAMS__LIMITS__MAX_INFLIGHT", "17")
    s = load_settings(cfg, environ={})
    assert s.kafka.group_id == "from-env" and s.kafka.partitions == 8
    assert s.limits.max_inflight == 17


def test_wrong_value_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("limits:\n  max_inflight: -3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    msg = str(info.value)
    assert "limits.max_inflight" in msg and "\n" not in msg


def test_unknown_key_is_rejected(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("retry:\n  max_atempts: 3\n")
    with pytest.raises(ConfigError, match="retry.max_atempts"):
        load_settings(cfg, environ={})


def test_api_key_from_env_is_secret_and_missing_env_is_clear(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "endpoints:\n  - name: oa\n    url: https://api.example.invalid/v1\n"
        "    api_key_env: MY_KEY\n"
    )
    s = load_settings(cfg, environ={"MY_KEY": "sk-secret-123"})
    ep = s.endpoints[0]
    assert ep.api_key is not None and ep.api_key.get_secret_value() == "sk-secret-123"
    assert "sk-secret-123" not in repr(s) and "sk-secret-123" not in str(s.model_dump())
    with pytest.raises(ConfigError, match="MY_KEY"):
        load_settings(cfg, environ={})


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kafka: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_endpoint_url_and_unique_names(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("endpoints:\n  - {name: a, url: ftp://x}\n")
    with pytest.raises(ConfigError, match="endpoints.0.url"):
        load_settings(cfg, environ={})
    cfg.write_text("endpoints:\n  - {name: a, url: http://x/v1}\n  - {name: a, url: http://y/v1}\n")
    with pytest.raises(ConfigError, match="unique"):
        load_settings(cfg, environ={})


def _env_names(node: object) -> set[str]:
    """Every value of a ``*_env`` key in a YAML document: the variables it needs."""
    if isinstance(node, dict):
        found = {v for k, v in node.items() if str(k).endswith("_env") and isinstance(v, str)}
        return found.union(*(_env_names(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_env_names(v) for v in node))
    return set()


CONFIGS = sorted((ROOT / "config").glob("*.yaml"))


def test_the_examples_are_there() -> None:
    assert {p.name for p in CONFIGS} >= {
        "default.yaml", "openai.yaml", "azure-openai.yaml", "vllm.yaml", "ollama.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    names = _env_names(yaml.safe_load(path.read_text()))
    environ = {n: f"secret-of-{n}" for n in names}
    s = load_settings(path, environ=environ)
    keyed = [e for e in s.endpoints if e.api_key_env]
    assert all(e.api_key is not None and e.api_key.get_secret_value() == f"secret-of-{e.api_key_env}"
               for e in keyed)
    assert all(e.serves(s.worker.default_model) for e in s.endpoints)
    for secret in environ.values():
        assert secret not in repr(s) and secret not in str(s) and secret not in s.model_dump_json()
    if names:  # a key named in the file is required: a missing variable is one clear line
        with pytest.raises(ConfigError, match="environment variable .* is not set"):
            load_settings(path, environ={})


def test_example_endpoints_say_what_each_provider_needs() -> None:
    def endpoints(name: str) -> list[EndpointConfig]:
        path = ROOT / "config" / name
        names = _env_names(yaml.safe_load(path.read_text()))
        return load_settings(path, environ={n: "k" for n in names}).endpoints

    (openai,) = endpoints("openai.yaml")
    assert openai.url == "https://api.openai.com/v1" and openai.api_key_header == "Authorization"
    assert openai.api_key_env == "OPENAI_API_KEY" and openai.rpm and openai.tpm
    for azure in endpoints("azure-openai.yaml"):
        assert "/openai/deployments/" in azure.url and azure.url.startswith("https://")
        assert azure.api_key_header == "api-key" and azure.api_version and azure.models
    (vllm,) = endpoints("vllm.yaml")
    assert vllm.url.endswith(":8000/v1") and vllm.api_key is None
    (ollama,) = endpoints("ollama.yaml")
    assert ollama.url.endswith(":11434/v1") and ollama.api_key is None


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, f in model.model_fields.items():
        if f.exclude:  # resolved secrets, never configured
            continue
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_default_yaml_mentions_every_key() -> None:
    text = (ROOT / "config" / "default.yaml").read_text()
    keys = _keys(Settings) + [f"endpoints.{k}" for k in _keys(EndpointConfig)]
    missing = [k for k in keys
               if not re.search(rf"^\s*(#\s*)?(- )?{re.escape(k.rsplit('.', 1)[-1])}:", text, re.M)]
    assert missing == []


def test_kafka_sasl_needs_user_and_password_env() -> None:
    with pytest.raises(ConfigError, match="kafka: .*sasl_username is required"):
        load_settings(environ={}, kafka={"security_protocol": "SASL_SSL"})
    with pytest.raises(ConfigError, match="sasl_password_env is required"):
        load_settings(environ={}, kafka={"security_protocol": "SASL_PLAINTEXT",
                                         "sasl_username": "alice"})
    s = load_settings(environ={"KP": "kafka-pw-1"}, kafka={
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_username": "alice", "sasl_password_env": "KP"})
    assert s.kafka.sasl_password is not None
    assert s.kafka.sasl_password.get_secret_value() == "kafka-pw-1"
    assert s.kafka.mechanism == "SCRAM-SHA-256"


def test_redis_url_forms_and_one_source_per_credential() -> None:
    for url in ("redis://h:6379/0", "rediss://u:p@h:6380/1", "unix:///run/redis.sock"):
        assert load_settings(environ={}, redis={"url": url}).redis.url.get_secret_value() == url
    with pytest.raises(ConfigError, match="redis.url: .*redis://, rediss://"):
        load_settings(environ={}, redis={"url": "http://h:6379"})
    with pytest.raises(ConfigError, match="password in the url or in password_env"):
        load_settings(environ={"P": "x"}, redis={"url": "redis://:p@h", "password_env": "P"})
    with pytest.raises(ConfigError, match="username in the url or in username"):
        load_settings(environ={}, redis={"url": "redis://u:p@h", "username": "v"})
    with pytest.raises(ConfigError, match="ssl_cafile needs a rediss"):
        load_settings(environ={}, redis={"url": "redis://h", "ssl_cafile": "/ca.pem"})
    assert load_settings(environ={}, redis={"url": "redis://app:p@h"}).redis.user == "app"
    assert load_settings(environ={}, redis={"url": "redis://h", "username": "u"}).redis.user == "u"
    assert load_settings(environ={}, redis={"url": "redis://:p@h"}).redis.user == "default"


def test_no_secret_in_repr_str_dump_or_errors(tmp_path: Path) -> None:
    environ = {"OA": "sk-openai-secret-1", "KP": "kafka-secret-2"}
    s = load_settings(
        environ=environ,
        kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
               "sasl_username": "alice", "sasl_password_env": "KP"},
        redis={"url": "rediss://app:url%2Fsecret-4@cache:6380/0"},
        endpoints=[{"name": "oa", "url": "https://api.openai.com/v1", "api_key_env": "OA"}],
    )
    secrets = [*environ.values(), "url%2Fsecret-4", "url/secret-4"]
    shown = [repr(s), str(s), s.model_dump_json(), str(s.model_dump()), repr(s.redis),
             repr(s.kafka), repr(s.endpoints[0])]
    for text in shown:
        for secret in secrets:
            assert secret not in text
    assert set(secrets) <= set(s.secret_values())
    from_env = load_settings(environ={"RP": "redis-secret-3"}, redis={"password_env": "RP"})
    assert "redis-secret-3" not in repr(from_env) and from_env.secret_values() == ["redis-secret-3"]
    # a wrong value next to a secret: the one-line error names the key, not the secret
    cfg = tmp_path / "c.yaml"
    cfg.write_text("redis:\n  url: 'redis://:hunter2-secret@h:notaport/0'\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert "redis.url" in str(info.value) and "hunter2-secret" not in str(info.value)


def test_a_secret_written_in_the_config_is_refused_not_dropped(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("endpoints:\n  - {name: oa, url: 'https://x/v1', api_key: sk-in-file-1}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert str(info.value) == ("invalid config key endpoints.oa.api_key: secrets are read from "
                               "the environment; name the variable in endpoints.oa.api_key_env")
    assert "sk-in-file-1" not in str(info.value)
    with pytest.raises(ConfigError, match="name the variable in kafka.sasl_password_env"):
        load_settings(environ={}, kafka={"sasl_password": "pw-in-file"})
    with pytest.raises(ConfigError, match="name the variable in redis.password_env"):
        load_settings(environ={}, redis={"password": "pw-in-file"})


_SECRET = "Zq7-secret-Wx9"
_TEMPLATE = (
    "kafka:\n  security_protocol: SASL_SSL\n  sasl_username: u\n  sasl_password_env: KP\n"
    f"redis:\n  url: 'redis://app:{_SECRET}@cache:6379/0'\n  key_prefix: p\n"
    "endpoints:\n  - name: a\n    url: http://x/v1\n    weight: 2\n"
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(_TEMPLATE)),
                          st.sampled_from(["", ":", "'", '"', "{", "[", "\t", " ", "\n", "*",
                                           "&", "!", "-", "#", "%", "@", "`", "|", ">", "?",
                                           "api_key: ", "sasl_password: ", "x"])),
                min_size=1, max_size=3))
def test_a_corrupted_config_never_echoes_the_secret_in_it(edits: list[tuple[int, str]]) -> None:
    text = _TEMPLATE
    for pos, insert in edits:
        text = text[:pos] + insert + text[pos + (1 if not insert else 0):]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "c.yaml"
        cfg.write_text(text)
        try:
            load_settings(cfg, environ={"KP": "kp"})
        except ConfigError as exc:
            assert _SECRET not in str(exc) and "\n" not in str(exc)


@given(st.text(max_size=12))
def test_kafka_codec_and_isolation_take_only_what_kafka_offers(value: str) -> None:
    codecs = {"none", "gzip", "snappy", "lz4", "zstd"}
    levels = {"read_committed", "read_uncommitted"}
    for key, allowed in (("compression_type", codecs), ("isolation_level", levels)):
        if value in allowed:
            assert getattr(load_settings(environ={}, kafka={key: value}).kafka, key) == value
        else:
            with pytest.raises(ConfigError, match=f"kafka.{key}"):
                load_settings(environ={}, kafka={key: value})


def test_kafka_defaults_read_committed_and_write_uncompressed() -> None:
    k = load_settings(environ={}).kafka
    assert k.isolation_level == "read_committed"
    assert k.compression_type == "none" and k.codec is None
    assert load_settings(environ={}, kafka={"compression_type": "zstd"}).kafka.codec == "zstd"

from __future__ import annotations

from pathlib import Path

import pytest

from streams.config import load_settings
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

"""Config errors through the real CLI (a subprocess): one line, exit 2, never a secret.

Each case puts a secret next to a YAML syntax error or a validation error, in the file or
in the environment; whatever PyYAML or pydantic would quote, the secret must not appear.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

REDIS_PW = "redis-pw-5ecret"
KAFKA_PW = "kafka-pw-5ecret"
API_KEY = "sk-api-key-5ecret"

# (config text, extra environment, the secret that must not be printed)
CASES: dict[str, tuple[str, dict[str, str], str]] = {
    "yaml: unclosed quote after a redis url": (
        f'redis:\n  url: "redis://app:{REDIS_PW}@cache:6379/0\n', {}, REDIS_PW),
    "yaml: bad indentation next to a redis url": (
        f"redis:\n  url: redis://:{REDIS_PW}@cache:6379/0\n   key_prefix: x\n", {}, REDIS_PW),
    "yaml: flow mapping left open on the url line": (
        f"redis: {{url: redis://:{REDIS_PW}@cache:6379/0\nkafka: {{}}\n", {}, REDIS_PW),
    "yaml: a kafka password written as an alias": (
        f"kafka:\n  sasl_password: *{KAFKA_PW}\n", {}, KAFKA_PW),
    "yaml: a tab before an api key": (
        f"endpoints:\n  - name: a\n    url: http://x/v1\n\tapi_key: {API_KEY}\n", {}, API_KEY),
    "yaml: an api key as a tag": (
        f"endpoints:\n  - name: a\n    url: http://x/v1\n    api_key: !{API_KEY} x\n", {},
        API_KEY),
    "pydantic: an api key next to a wrong weight": (
        f"endpoints:\n  - {{name: a, url: 'http://x/v1', api_key: {API_KEY}, weight: -1}}\n",
        {}, API_KEY),
    "pydantic: a kafka password next to a wrong protocol": (
        f"kafka:\n  security_protocol: SASL\n  sasl_password: {KAFKA_PW}\n", {}, KAFKA_PW),
    "pydantic: a redis url with a bad port": (
        f"redis:\n  url: 'redis://:{REDIS_PW}@cache:port/0'\n", {}, REDIS_PW),
    "pydantic: a redis url with a password query and a wrong scheme": (
        f"redis:\n  url: 'http://cache:6379/0?password={REDIS_PW}'\n", {}, REDIS_PW),
    "env: a redis url with a bad port": (
        "", {"LLM_STREAMS__REDIS__URL": f"redis://:{REDIS_PW}@cache:port/0"}, REDIS_PW),
    "env: endpoints json broken after an api key": (
        "", {"LLM_STREAMS__ENDPOINTS": f'[{{"name": "a", "api_key": "{API_KEY}", url: x}}]'},
        API_KEY),
    "env: a kafka section json broken after a password": (
        "", {"LLM_STREAMS__KAFKA": f'{{"sasl_password": {KAFKA_PW}}}'}, KAFKA_PW),
    "a password pasted into password_env": (
        f"redis:\n  password_env: '{REDIS_PW}!'\n", {}, REDIS_PW),
    "a password pasted into sasl_password_env that looks like a name": (
        "kafka:\n  security_protocol: SASL_PLAINTEXT\n  sasl_username: u\n"
        "  sasl_password_env: kafkaPw5ecret\n", {}, "kafkaPw5ecret"),
    "an api key pasted into api_key_env": (
        f"endpoints:\n  - {{name: a, url: 'http://x/v1', api_key_env: '{API_KEY}'}}\n", {},
        API_KEY),
}


def _worker(cfg: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``llm-streams worker --config cfg`` with only ``env`` as LLM_STREAMS__ overrides."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LLM_STREAMS__")}
    return subprocess.run(
        [sys.executable, "-m", "streams.tools.cli", "worker", "--config", str(cfg)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**clean, **(env or {})},
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_errors_print_one_line_without_the_secret(tmp_path: Path, case: str) -> None:
    text, env, secret = CASES[case]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    proc = _worker(cfg, env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert secret not in out, out
    assert proc.stderr.startswith("llm-streams: ") and proc.stderr.count("\n") == 1, out
    assert "Traceback" not in out


def test_a_yaml_error_still_says_where(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CASES["yaml: unclosed quote after a redis url"][0])
    proc = _worker(cfg)
    assert "not valid YAML at line 3, column 1: found unexpected end of stream" in proc.stderr


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"redis:\n  url: redis://:\xff\xfe@h/0\n")
    proc = _worker(cfg)
    assert proc.returncode == 2 and proc.stderr == f"llm-streams: config file {cfg} is not UTF-8 text\n"

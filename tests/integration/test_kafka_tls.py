"""Kafka over TLS on brokers of the tests' own (scripts/stack.sh in TLS mode, certificates made
by tests/integration/kafka_tls.py with openssl and keytool): SSL with a client certificate and
SASL_SSL with SCRAM answer requests end to end; a wrong CA and an expired client certificate
each stop the worker at start with one line and exit 1, showing no secret.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Mock, Stack, Worker, start_worker
from tests.integration.kafka_tls import (
    STORE_PASSWORD,
    KafkaTls,
    KafkaTlsFiles,
    TlsKafka,
    make_kafka_tls_files,
    tls_kafka,
)
from tests.integration.servers import serving
from tests.integration.test_security import _answers_all, _single_line_failure, _stack

SCRAM_PASSWORD = "kafka-tls-Pw-93c1e"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> KafkaTlsFiles:
    return make_kafka_tls_files(tmp_path_factory.mktemp("kafka-tls-files"))


@pytest.fixture(scope="module")
def ssl_broker(tmp_path_factory: pytest.TempPathFactory, tls_files: KafkaTlsFiles
               ) -> Iterator[TlsKafka]:
    with serving(tls_kafka(tmp_path_factory.mktemp("ssl-kafka"), tls_files)) as kafka:
        yield kafka


@pytest.fixture
def sasl_ssl_broker(tmp_path: Path, tls_files: KafkaTlsFiles) -> Iterator[TlsKafka]:
    """SCRAM over TLS that authenticates the broker only (no client certificates)."""
    with serving(tls_kafka(tmp_path / "sasl-ssl-kafka", tls_files, user="alice",
                           password=SCRAM_PASSWORD, client_auth="none")) as kafka:
        yield kafka


def _secure(stack: Stack, broker: TlsKafka, client: KafkaTls) -> Stack:
    return _stack(stack, kafka=broker.bootstrap, sasl=client)


def _worker(stack: Stack, broker: TlsKafka, client: KafkaTls) -> Worker:
    return start_worker(_secure(stack, broker, client), env=client.worker_env())


def _no_secret(files: KafkaTlsFiles) -> list[str]:
    """The secrets a worker's output must not show, checked by _single_line_failure."""
    keys = [files.client_key.read_text(), files.expired_key.read_text()]
    return [STORE_PASSWORD, SCRAM_PASSWORD, *(k.splitlines()[1] for k in keys)]


async def test_ssl_with_a_client_certificate_answers_requests(
    ssl_broker: TlsKafka, stack: Stack, mocks: list[Mock]
) -> None:
    client = ssl_broker.client()
    secure = _secure(stack, ssl_broker, client)
    assert secure.config()["kafka"]["security_protocol"] == "SSL"
    await _answers_all(secure, client.worker_env())


async def test_sasl_ssl_with_scram_answers_requests(
    sasl_ssl_broker: TlsKafka, stack: Stack, mocks: list[Mock]
) -> None:
    client = sasl_ssl_broker.client(client_cert=False)
    secure = _secure(stack, sasl_ssl_broker, client)
    assert secure.config()["kafka"]["security_protocol"] == "SASL_SSL"
    worker = await _answers_all(secure, client.worker_env())
    assert SCRAM_PASSWORD not in worker.log.read_text(errors="replace")
    # the right password behind a CA the worker does not trust: one line, no password
    bad = _worker(stack, sasl_ssl_broker,
                     sasl_ssl_broker.client(client_cert=False, cafile=sasl_ssl_broker.files.other_ca))
    _single_line_failure(
        bad, f"kafka TLS handshake failed at {sasl_ssl_broker.bootstrap}: CERTIFICATE_VERIFY_FAILED",
        _no_secret(sasl_ssl_broker.files))


async def test_ssl_wrong_ca_stops_the_worker_with_one_line(
    ssl_broker: TlsKafka, stack: Stack, mocks: list[Mock]
) -> None:
    worker = _worker(stack, ssl_broker, ssl_broker.client(cafile=ssl_broker.files.other_ca))
    _single_line_failure(
        worker, f"kafka TLS handshake failed at {ssl_broker.bootstrap}: CERTIFICATE_VERIFY_FAILED",
        _no_secret(ssl_broker.files))


async def test_ssl_expired_client_certificate_stops_the_worker_with_one_line(
    ssl_broker: TlsKafka, stack: Stack, mocks: list[Mock]
) -> None:
    """The broker refuses the certificate after the handshake (TLS 1.3): the first request's
    closed connection carries the alert, which the worker names instead of "not reachable"."""
    f = ssl_broker.files
    worker = _worker(stack, ssl_broker,
                     ssl_broker.client(certfile=f.expired_cert, keyfile=f.expired_key))
    _single_line_failure(
        worker,
        f"kafka TLS handshake failed at {ssl_broker.bootstrap}: SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        _no_secret(f))

"""A Kafka broker of one test module's own with a TLS listener (scripts/stack.sh in TLS mode),
and the files it needs, made here with ``openssl`` and ``keytool``: a CA, the broker's PKCS12
keystore and truststore, a client certificate, an expired client certificate and a second CA
that signed nothing the broker shows.
"""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tests.integration.servers import PrivateKafka, Sasl

STORE_PASSWORD = "store-Pw-0d4c7a"  # the keystores' password: never in a worker's output


@dataclass(frozen=True)
class KafkaTlsFiles:
    ca: Path
    keystore: Path  # the broker's key and certificate (PKCS12)
    truststore: Path  # the CA the broker checks client certificates against (PKCS12)
    client_cert: Path
    client_key: Path
    expired_cert: Path
    expired_key: Path
    other_ca: Path  # a CA that signed neither the broker nor the clients


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60, cwd=cwd)


def _ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=folder)


def _signed(folder: Path, name: str, extra: str = "") -> None:
    """``name``.pem/.key signed by ca, valid for a day, for 127.0.0.1."""
    (folder / f"{name}.ext").write_text(f"subjectAltName=IP:127.0.0.1\n{extra}")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=folder)
    _openssl("x509", "-req", "-days", "1", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey",
             "ca.key", "-CAcreateserial", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
             cwd=folder)


def _expired(folder: Path, name: str) -> None:
    """A client certificate signed by ca that expired in 2021 (``openssl ca`` sets the dates)."""
    (folder / "index.txt").write_text("")
    (folder / "serial").write_text("1000\n")
    (folder / "ca.cnf").write_text(
        "[ca]\ndefault_ca=it\n[it]\ndatabase=index.txt\nserial=serial\nnew_certs_dir=.\n"
        "default_md=sha256\npolicy=any\nunique_subject=no\n[any]\ncommonName=supplied\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=folder)
    _openssl("ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key",
             "-startdate", "20200101000000Z", "-enddate", "20210101000000Z", "-notext",
             "-in", f"{name}.csr", "-out", f"{name}.pem", cwd=folder)


def make_kafka_tls_files(folder: Path) -> KafkaTlsFiles:
    folder.mkdir(parents=True, exist_ok=True)
    _ca(folder, "ca")
    _ca(folder, "other-ca")
    _signed(folder, "broker")
    _signed(folder, "client", "extendedKeyUsage=clientAuth\n")
    _expired(folder, "expired")
    _openssl("pkcs12", "-export", "-name", "broker", "-in", "broker.pem", "-inkey", "broker.key",
             "-certfile", "ca.pem", "-out", "broker.p12", "-passout", f"pass:{STORE_PASSWORD}",
             cwd=folder)
    subprocess.run(
        ["keytool", "-importcert", "-noprompt", "-alias", "ca", "-file", "ca.pem",
         "-keystore", "truststore.p12", "-storetype", "PKCS12", "-storepass", STORE_PASSWORD],
        check=True, capture_output=True, timeout=60, cwd=folder,
    )
    return KafkaTlsFiles(
        ca=folder / "ca.pem", keystore=folder / "broker.p12", truststore=folder / "truststore.p12",
        client_cert=folder / "client.pem", client_key=folder / "client.key",
        expired_cert=folder / "expired.pem", expired_key=folder / "expired.key",
        other_ca=folder / "other-ca.pem",
    )


@dataclass(frozen=True)
class KafkaTls(Sasl):
    """A client's view of a TLS broker (SSL, or SASL_SSL when ``user`` is set).

    It stands in for ``Sasl`` in the harness (producer, collector, ``Stack.config``), whose
    clients it configures with the test's CA and client certificate.
    """

    files: KafkaTlsFiles | None = None
    cafile: Path | None = None  # None: the right CA
    certfile: Path | None = None  # None: the valid client certificate
    keyfile: Path | None = None
    client_cert: bool = True  # False: no client certificate (SASL_SSL, server-side TLS only)

    @property
    def protocol(self) -> str:
        return "SASL_SSL" if self.user else "SSL"

    def _paths(self) -> tuple[Path, Path, Path]:
        assert self.files is not None
        f = self.files
        return (self.cafile or f.ca, self.certfile or f.client_cert, self.keyfile or f.client_key)

    def client_kwargs(self) -> dict[str, Any]:
        ca, cert, key = self._paths()
        ctx = ssl.create_default_context(cafile=str(ca))
        if self.client_cert:
            ctx.load_cert_chain(str(cert), str(key))
        sasl = super().client_kwargs() if self.user else {}
        return {**sasl, "security_protocol": self.protocol, "ssl_context": ctx}

    def config(self) -> dict[str, Any]:
        ca, cert, key = self._paths()
        sasl = super().config() if self.user else {}
        certs = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)} if self.client_cert else {}
        return {**sasl, "security_protocol": self.protocol, "ssl_cafile": str(ca), **certs}

    def worker_env(self, password: str | None = None) -> dict[str, str]:
        return super().worker_env(password) if self.user else {}


@dataclass
class TlsKafka(PrivateKafka):
    """scripts/stack.sh in TLS mode (SASL_SSL when ``sasl.user`` is set) on free ports.

    Never the shared broker: its state lives under ``state`` and stop() stops only its pid.
    """

    sasl: KafkaTls = field(default_factory=lambda: KafkaTls("", ""))
    client_auth: str = "required"  # the broker's ssl.client.auth

    @property
    def files(self) -> KafkaTlsFiles:
        assert self.sasl.files is not None
        return self.sasl.files

    def client(self, **changes: Any) -> KafkaTls:
        """The broker's client settings, e.g. with ``cafile`` or ``certfile`` changed."""
        return replace(self.sasl, **changes)

    def _env(self) -> dict[str, str]:
        return {**super()._env(), "KAFKA_SSL_KEYSTORE": str(self.files.keystore),
                "KAFKA_SSL_TRUSTSTORE": str(self.files.truststore),
                "KAFKA_SSL_PASSWORD": STORE_PASSWORD, "KAFKA_SSL_CLIENT_AUTH": self.client_auth,
                "KAFKA_HEAP": "384m"}


def tls_kafka(state: Path, files: KafkaTlsFiles, user: str = "", password: str = "",
              client_auth: str = "required") -> TlsKafka:
    return TlsKafka(state, KafkaTls(user, password, files=files), client_auth=client_auth)

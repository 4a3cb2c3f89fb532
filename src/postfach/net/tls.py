"""TLS: server contexts (TLS >= 1.2 only), self-signed certificates for ``init``, reload on SIGHUP."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from postfach.config import Config
from postfach.errors import ConfigError

log = logging.getLogger("postfach.tls")


def generate_self_signed(hostname: str, cert_path: Path, key_path: Path, *, days: int = 825) -> None:
    """A self-signed ECDSA P-256 certificate for ``hostname``.

    It carries the host name (and ``localhost``) as DNS names: mbsync, offlineimap and fetchmail
    match DNS names only, never an IP address in the certificate (CLIENT-QUIRKS.md)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    dns_names = [hostname] + (["localhost"] if hostname != "localhost" else [])
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def server_context(cert_path: Path, key_path: Path, min_version: str = "1.2") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except FileNotFoundError as e:
        raise ConfigError(f"tls: cannot read {e.filename}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"tls: cannot load certificate {cert_path} / key {key_path}: {e}") from None
    return ctx


class TlsManager:
    """Holds the current server context; ``reload()`` (on SIGHUP) swaps in re-read certificates.
    Connections already open keep the context they started with."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._ctx = self._load()

    def _load(self) -> ssl.SSLContext:
        c = self._config
        return server_context(c.path(c.tls.cert), c.path(c.tls.key), c.tls.min_version)

    def context(self) -> ssl.SSLContext:
        return self._ctx

    def reload(self) -> bool:
        try:
            self._ctx = self._load()
        except ConfigError as e:
            log.error("certificate reload failed, keeping the old one: %s", e)
            return False
        log.info("certificates reloaded")
        return True

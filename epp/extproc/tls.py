"""TLS for the ext_proc gRPC port (`epp serve --secure-serving`).

Like the ecosystem's EPP: with `--cert-path DIR` the server presents `DIR/tls.crt` with
`DIR/tls.key` (a mounted Secret) and picks up a rotated pair on the next handshake without
a restart; without it, a self-signed pair is generated at start (the gateway then encrypts
but cannot verify, which is what the ecosystem's gateways do with `insecureSkipVerify`).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import threading
import time
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
SELF_SIGNED_NAMES = ("epp", "localhost", "127.0.0.1")


def self_signed_pair(names: tuple[str, ...] = SELF_SIGNED_NAMES) -> tuple[bytes, bytes]:
    """A fresh P-256 key and a self-signed certificate for `names` (DNS names or IPs),
    valid for ten years. Returns (certificate PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class _ReloadingPair:
    """Certificate fetcher for gRPC's dynamic credentials: called on handshakes (from gRPC's
    threads), it re-reads the pair when the files changed, at most once per `period`."""

    def __init__(self, cert_dir: Path, period: float = 1.0) -> None:
        self.cert = cert_dir / CERT_FILE
        self.key = cert_dir / KEY_FILE
        self.period = period
        self._lock = threading.Lock()
        self._checked = 0.0
        self._stamp = self._stat()

    def _stat(self) -> tuple[float, float, int, int]:
        c, k = os.stat(self.cert), os.stat(self.key)
        return (c.st_mtime, k.st_mtime, c.st_ino, k.st_ino)

    def config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key.read_bytes(), self.cert.read_bytes())]
        )

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        now = time.monotonic()
        with self._lock:
            if now - self._checked < self.period:
                return None
            self._checked = now
            try:
                stamp = self._stat()
                if stamp == self._stamp:
                    return None
                cfg = self.config()
            except OSError as e:  # mid-rotation: keep serving the old pair
                log.warning("TLS pair in %s unreadable, keeping the old one: %s", self.cert, e)
                return None
            self._stamp = stamp
        log.info("TLS pair in %s reloaded", self.cert.parent)
        return cfg


def server_credentials(cert_path: str | None) -> grpc.ServerCredentials:
    """Credentials for the ext_proc port: the pair in `cert_path` (reloaded when it
    changes), else a self-signed pair generated now."""
    if not cert_path:
        cert, key = self_signed_pair()
        log.info("TLS: serving a self-signed certificate generated at start")
        return grpc.ssl_server_credentials([(key, cert)])
    fetcher = _ReloadingPair(Path(cert_path))
    # gRPC's stub says the fetcher never returns None; gRPC itself takes None as "no change".
    return grpc.dynamic_ssl_server_credentials(fetcher.config(), fetcher)  # type: ignore[arg-type]

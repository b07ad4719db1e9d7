"""Envoy talks TLS to the EPP's ext_proc port (`epp serve --secure-serving`)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.faults import envoy_counter
from tests.integration.conftest import GatewayFactory, endpoint_dicts
from tests.integration.helpers import metric_samples, post

pytestmark = pytest.mark.integration

_PEM = serialization.Encoding.PEM


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], dns: str, out: Path) -> None:
    """tls.crt + tls.key for `dns`, signed by `ca`, in `out` (the --cert-path layout)."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tls.crt").write_bytes(cert.public_bytes(_PEM))
    (out / "tls.key").write_bytes(
        key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def write_ca(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], path: Path) -> str:
    path.write_bytes(ca[0].public_bytes(_PEM))
    return str(path)


async def test_envoy_verifies_the_epp_certificate_and_refuses_a_wrong_ca(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory, tmp_path: Path
) -> None:
    good_ca, other_ca = make_ca("epp test CA"), make_ca("someone else")
    issue(good_ca, "epp", tmp_path / "certs")
    epp_args = ["--secure-serving", "--cert-path", str(tmp_path / "certs")]
    body = {"model": "m", "prompt": "over TLS"}

    gw = await gateway(
        endpoint_dicts(echo_pool),
        epp_args=epp_args,
        envoy_overrides={"epp_tls": True, "epp_ca_file": write_ca(good_ca, tmp_path / "ca.pem")},
    )
    status, _, raw = await post(gw, body)
    assert status == 200, raw
    assert await envoy_counter(gw, "cluster.epp.ssl.handshake") >= 1

    wrong = await gateway(
        endpoint_dicts(echo_pool),
        epp_args=epp_args,
        envoy_overrides={"epp_tls": True, "epp_ca_file": write_ca(other_ca, tmp_path / "x.pem")},
    )
    status, _, _ = await post(wrong, body)
    assert status >= 500  # ext_proc unreachable and the gateway fails closed
    assert await envoy_counter(wrong, "cluster.epp.ssl.fail_verify_error") >= 1
    picks = metric_samples(await wrong.metrics_text(), "epp_endpoint_picks_total")
    assert not picks  # the EPP never saw the request


async def test_self_signed_pair_generated_at_start_and_plaintext_refused(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    # No --cert-path: the EPP makes its own pair; the gateway encrypts without verifying.
    gw = await gateway(
        endpoint_dicts(echo_pool), epp_args=["--secure-serving"], envoy_overrides={"epp_tls": True}
    )
    status, _, raw = await post(gw, {"model": "m", "prompt": "x"})
    assert status == 200, raw
    # A plaintext gateway cannot talk to a TLS port.
    plain = await gateway(endpoint_dicts(echo_pool), epp_args=["--secure-serving"])
    status, _, _ = await post(plain, {"model": "m", "prompt": "x"})
    assert status >= 500

"""`--cert-path`: the ext_proc port presents the mounted pair and a rotated one without a
restart; without a path, a self-signed pair generated at start."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from epp.extproc.tls import self_signed_pair, server_credentials
from tests.integration.test_tls import _PEM, issue, make_ca


async def check(port: int, ca_pem: bytes) -> bool:
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    options = [("grpc.ssl_target_name_override", "epp")]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options) as ch:
        try:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return False
    return True


async def serve(creds: grpc.ServerCredentials) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    return server, port


async def test_rotated_pair_is_served_without_a_restart(tmp_path: Path) -> None:
    ca1, ca2 = make_ca("first"), make_ca("second")
    certs = tmp_path / "certs"
    issue(ca1, "epp", certs)
    server, port = await serve(server_credentials(str(certs)))
    try:
        pem1, pem2 = ca1[0].public_bytes(_PEM), ca2[0].public_bytes(_PEM)
        assert await check(port, pem1)
        assert not await check(port, pem2)
        # Rotate (as a Secret update would): new files, then the next handshakes use them.
        staged = tmp_path / "staged"
        issue(ca2, "epp", staged)
        for name in ("tls.key", "tls.crt"):
            os.replace(staged / name, certs / name)
        deadline = time.monotonic() + 5
        while not await check(port, pem2):
            assert time.monotonic() < deadline, "rotated certificate not served"
            await asyncio.sleep(0.2)
        assert not await check(port, pem1)
    finally:
        await server.stop(0)


async def test_self_signed_pair() -> None:
    cert_pem, key_pem = self_signed_pair()
    cert = x509.load_pem_x509_certificate(cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "epp" in sans.get_values_for_type(x509.DNSName)
    assert b"PRIVATE KEY" in key_pem
    server, port = await serve(server_credentials(None))
    try:
        assert not await check(port, cert_pem)  # a fresh pair each start, not this one
    finally:
        await server.stop(0)

"""Real processes on loopback: echo backends, a simulator pool, EPP + Envoy gateways."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from epp.devstack.procs import free_port, stop_process, wait_http
from epp.devstack.stack import GatewayHandle, start_gateway

ROOT = Path(__file__).resolve().parents[2]
ECHO_IPS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
SIM_IPS = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
SIM_MODEL = "sim-model"

pytestmark = pytest.mark.integration


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.fixture(scope="session")
def echo_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[str, int]]]:
    port = free_port()
    log = tmp_path_factory.mktemp("echo") / "echo.log"
    proc = _spawn(
        ["-m", "tests.integration.echo_backend", "--ips", ",".join(ECHO_IPS), "--port", str(port)],
        log,
    )
    try:
        for ip in ECHO_IPS:
            asyncio.run(wait_http(f"http://{ip}:{port}/health", proc=proc))
        yield [(ip, port) for ip in ECHO_IPS]
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def sim_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[str, int]]]:
    port = free_port()
    log = tmp_path_factory.mktemp("sim") / "sim.log"
    proc = _spawn(
        [
            "-m", "epp.sim", "--servers", str(len(SIM_IPS)), "--base-ip", SIM_IPS[0],
            "--port", str(port), "--model", SIM_MODEL, "--time-scale", "0.2",
        ],
        log,
    )  # fmt: skip
    try:
        for ip in SIM_IPS:
            asyncio.run(wait_http(f"http://{ip}:{port}/health", proc=proc))
        yield [(ip, port) for ip in SIM_IPS]
    finally:
        stop_process(proc)


GatewayFactory = Callable[..., Awaitable[GatewayHandle]]


@pytest.fixture
def gateway() -> Iterator[GatewayFactory]:
    """Start EPP + Envoy for a list of endpoint dicts; stopped at the end of the test."""
    started: list[GatewayHandle] = []

    async def make(endpoints: list[dict[str, Any]], **kwargs: Any) -> GatewayHandle:
        gw = await start_gateway(endpoints, **kwargs)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.close()


def endpoint_dicts(
    pool: list[tuple[str, int]], labels: list[dict[str, str]] | None = None
) -> list[dict[str, Any]]:
    out = []
    for i, (ip, port) in enumerate(pool):
        entry: dict[str, Any] = {"address": ip, "port": port, "name": f"pod-{i}"}
        if labels is not None:
            entry["labels"] = labels[i]
        out.append(entry)
    return out

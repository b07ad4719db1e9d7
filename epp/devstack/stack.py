"""A standalone gateway on loopback: `epp serve` (endpoints file) + Envoy in front of it.

Used by `make run`, the integration tests and the benchmarks:

    async with start_gateway([{"address": "127.0.0.2", "port": 8000}]) as gw:
        ... send requests to gw.url ...
"""

from __future__ import annotations

import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import yaml

from epp.devstack.envoy import EnvoyOptions, render_envoy_config, start_envoy
from epp.devstack.procs import free_port, stop_process, wait_http


@dataclass
class GatewayHandle:
    workdir: Path
    listen_port: int
    admin_port: int
    epp_ports: list[int]
    metrics_ports: list[int]
    endpoints_file: Path
    epp_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    epp_cmds: list[list[str]] = field(default_factory=list)  # to restart one (restart_epp)
    sync_ports: list[int] = field(default_factory=list)  # state sync between the EPPs
    envoy: subprocess.Popen[bytes] | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_ports[0]}/metrics"

    def write_endpoints(self, endpoints: Sequence[dict[str, Any]]) -> None:
        """Replace the endpoints file atomically (the EPP reloads it)."""
        tmp = self.endpoints_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"endpoints": list(endpoints)}))
        tmp.replace(self.endpoints_file)

    async def metrics_text(self, index: int = 0) -> str:
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{self.metrics_ports[index]}/metrics"
            async with s.get(url) as r:
                return await r.text()

    async def restart_epp(self, index: int) -> None:
        """Start EPP `index` again with its command (after a kill), and wait until ready."""
        stop_process(self.epp_procs[index])
        log = open(self.workdir / f"epp-{index}.log", "ab")  # noqa: SIM115
        self.epp_procs[index] = subprocess.Popen(
            self.epp_cmds[index], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        await wait_http(
            f"http://127.0.0.1:{self.metrics_ports[index]}/readyz", proc=self.epp_procs[index]
        )

    async def sync_state(self, index: int) -> dict[str, Any]:
        """EPP `index`'s /debug/sync (its peers, their staleness and loads)."""
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{self.metrics_ports[index]}/debug/sync"
            async with s.get(url) as r:
                data: dict[str, Any] = await r.json()
                return data

    def close(self) -> None:
        stop_process(self.envoy)
        for p in self.epp_procs:
            stop_process(p)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> GatewayHandle:
        return self

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        ev: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def free_port_block(n: int) -> int:
    """A port p with p .. p+n-1 free (`epp serve --workers n` serves metrics on p + i).
    Looked for below the kernel's ephemeral range, where consecutive ports stay free."""
    if n == 1:
        return free_port()
    rng = random.Random()
    for _ in range(500):
        p = rng.randrange(20_000, 32_000 - n)
        try:
            for q in range(p, p + n):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    # as the servers that will listen there do (TIME_WAIT is no conflict)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(("127.0.0.1", q))
        except OSError:
            continue
        return p
    raise RuntimeError(f"no block of {n} free ports")


async def start_gateway(
    endpoints: Sequence[dict[str, Any]],
    *,
    listen_port: int = 0,
    config_text: str | None = None,
    body_mode: str = "FULL_DUPLEX_STREAMED",
    response_headers: bool = True,
    response_body: bool = False,
    access_log: bool = False,
    epp_args: Sequence[str] = (),
    epp_processes: int = 1,
    sync: bool = True,
    epp_workers: int = 1,
    envoy_concurrency: int = 1,
    workdir: str | None = None,
    scrape_interval: float = 0.05,
    envoy_overrides: dict[str, Any] | None = None,
) -> GatewayHandle:
    """`envoy_overrides`: extra `EnvoyOptions` fields (upstream, retries, epp_tls, ...).

    `epp_processes` EPP replicas, each on its own ports, all in Envoy's ext_proc cluster;
    with `sync` they share state (`--peers`), else they are independent. `epp_workers` > 1
    runs each as `epp serve --workers N` (one port, SO_REUSEPORT). `access_log`: the
    response phase through Envoy's gRPC access log (`--response-from-access-log`), not
    response headers."""
    # Debugging hooks for runs driven by other tools (bench.run): keep the logs in a fixed
    # folder and pass extra flags to `epp serve`.
    workdir = workdir or os.environ.get("EPP_DEVSTACK_WORKDIR") or None
    epp_args = [*epp_args, *shlex.split(os.environ.get("EPP_DEVSTACK_ARGS", ""))]
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="epp-gw-")
        workdir = tmp.name
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    gw = GatewayHandle(
        workdir=wd,
        listen_port=listen_port or free_port(),
        admin_port=free_port(),
        epp_ports=[free_port() for _ in range(epp_processes)],
        metrics_ports=[free_port_block(epp_workers) for _ in range(epp_processes)],
        sync_ports=[free_port() for _ in range(epp_processes)],
        endpoints_file=wd / "endpoints.yaml",
        _tmp=tmp,
    )
    gw.write_endpoints(endpoints)
    envoy_extra = dict(envoy_overrides or {})
    eds_path = wd / "eds" / "pool.yaml"  # written by the first EPP (--envoy-eds-file)
    envoy_extra.setdefault("eds_path", str(eds_path))
    if epp_workers > 1:  # several HTTP/2 connections, for the kernel to spread over workers
        envoy_extra.setdefault("epp_max_streams", 8)
    try:
        for i, (port, mport) in enumerate(zip(gw.epp_ports, gw.metrics_ports, strict=True)):
            cmd = [
                sys.executable,
                "-m",
                "epp.cli",
                "serve",
                "--grpc-port",
                str(port),
                "--grpc-health-port",
                str(free_port()),
                "--metrics-port",
                str(mport),
                "--endpoints-file",
                str(gw.endpoints_file),
                "--body-mode",
                body_mode,
                "--scrape-interval",
                str(scrape_interval),
            ]
            if config_text is not None:
                cmd += ["--config-text", config_text]
            if access_log:
                cmd.append("--response-from-access-log")
            if i == 0:
                cmd += ["--envoy-eds-file", envoy_extra["eds_path"]]
            if epp_processes > 1 and sync:
                peers = [f"127.0.0.1:{p}" for j, p in enumerate(gw.sync_ports) if j != i]
                cmd += ["--sync-port", str(gw.sync_ports[i]), "--peers", ",".join(peers)]
                cmd += ["--sync-id", f"epp-{i}"]
            if epp_workers > 1:
                cmd += ["--workers", str(epp_workers)]
                if not sync:
                    cmd += ["--sync", "off"]
            cmd += list(epp_args)
            gw.epp_cmds.append(cmd)
            log = open(wd / f"epp-{i}.log", "wb")  # noqa: SIM115 (lives as long as the process)
            gw.epp_procs.append(
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
        for proc, mport in zip(gw.epp_procs, gw.metrics_ports, strict=True):
            for w in range(epp_workers):  # worker w serves metrics on mport + w
                await wait_http(f"http://127.0.0.1:{mport + w}/readyz", proc=proc)
        opts = EnvoyOptions(
            listen_port=gw.listen_port,
            admin_port=gw.admin_port,
            epp_ports=gw.epp_ports,
            body_mode=body_mode,
            response_headers=response_headers,
            response_body=response_body,
            access_log=access_log,
            **envoy_extra,
        )
        gw.envoy = start_envoy(render_envoy_config(opts), wd, concurrency=envoy_concurrency)
        await wait_http(f"{gw.admin_url}/ready", proc=gw.envoy)
    except BaseException:
        for p in wd.glob("*.log"):
            sys.stderr.write(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}\n")
        gw.close()
        raise
    return gw

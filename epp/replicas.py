"""Several EPP instances sharing state: replicas (`--peers`, `--sync-service`) and worker
processes on one host (`--workers N`). The protocol, ledger and merging live in epp/sync/;
this module is the `epp serve` side: flags, wiring and the worker supervisor.

`--workers N` makes `epp serve` a supervisor of N worker processes (the same command with
`--worker-index i`), each serving ext_proc and gRPC health on the same ports with
SO_REUSEPORT (the kernel spreads connections over them), Prometheus on --metrics-port + i,
and sharing state with its siblings over unix sockets in --sync-socket-dir. A worker that
dies is restarted; SIGTERM is forwarded to every worker, which drains and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from epp.api.errors import UserError
from epp.datalayer.datastore import Datastore
from epp.requestcontrol.config import RequestControl
from epp.requestcontrol.hooks.replica_sync import ReplicaSync
from epp.sync.ledger import LocalLedger
from epp.sync.membership import KubePeers, StaticPeers
from epp.sync.merge import PeerView
from epp.sync.metrics import SyncMetrics
from epp.sync.node import SyncNode

log = logging.getLogger("epp.replicas")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("replicas and worker processes (state sync)")
    g.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the gRPC ports (SO_REUSEPORT) and their state "
        "over unix sockets (default: 1)",
    )
    g.add_argument(
        "--sync",
        choices=["on", "off"],
        default="on",
        help="share in-flight load, prefix inserts and queue depths with the other "
        "replicas / workers; off = independent instances (default: on)",
    )
    g.add_argument(
        "--peers",
        default="",
        help="standalone: the other EPP instances' sync addresses, host:port,... (default: none)",
    )
    g.add_argument(
        "--sync-service",
        default="",
        help="Kubernetes: the EPP's own Service; its Endpoints are the replicas (default: none)",
    )
    g.add_argument(
        "--sync-namespace",
        default="",
        help="namespace of --sync-service (default: $POD_NAMESPACE, else --pool-namespace)",
    )
    g.add_argument(
        "--sync-port-name",
        default="sync",
        help="name of the sync port in --sync-service (default: sync)",
    )
    g.add_argument(
        "--sync-port",
        type=int,
        default=9004,
        help="state-sync gRPC port, served when there are replicas to sync with "
        "(default: 9004; 0 = a free port)",
    )
    g.add_argument(
        "--sync-id",
        default="",
        help="this instance's name among its peers (default: $POD_NAME, else host:grpc-port)",
    )
    g.add_argument(
        "--sync-flush-interval",
        type=float,
        default=0.005,
        help="at most one batch of changes per peer this often; a change after a quiet "
        "spell goes at once (default: 0.005)",
    )
    g.add_argument(
        "--sync-snapshot-interval",
        type=float,
        default=0.5,
        help="seconds between full snapshots, the heartbeat (default: 0.5)",
    )
    g.add_argument(
        "--sync-peer-timeout",
        type=float,
        default=2.0,
        help="a peer silent this long is dropped with its load (default: 2.0)",
    )
    g.add_argument(
        "--drain-delay",
        type=float,
        default=0.0,
        help="on SIGTERM, seconds between turning not-ready and refusing new streams, so "
        "the gateway's health checks move traffic to the other replicas first (default: 0)",
    )
    g.add_argument(
        "--worker-index",
        type=int,
        default=-1,
        help="internal, set by --workers: this process's worker number (default: -1)",
    )
    g.add_argument(
        "--sync-socket-dir",
        default="",
        help="folder of the workers' unix sockets, with --workers (default: a temp folder)",
    )


class SyncPortError(UserError):
    pass


def is_supervisor(args: argparse.Namespace) -> bool:
    return int(args.workers) > 1 and int(args.worker_index) < 0


def is_worker(args: argparse.Namespace) -> bool:
    return int(args.worker_index) >= 0


def metrics_port(args: argparse.Namespace) -> int:
    port = int(args.metrics_port)
    return port + int(args.worker_index) if is_worker(args) and port else port


def _remote_sync(args: argparse.Namespace) -> bool:
    return bool(args.peers or args.sync_service)


def sync_enabled(args: argparse.Namespace) -> bool:
    return args.sync == "on" and (_remote_sync(args) or (is_worker(args) and args.workers > 1))


def _group(args: argparse.Namespace) -> str:
    if args.sync_id:
        return str(args.sync_id)
    if pod := os.environ.get("POD_NAME"):
        return pod
    return f"{socket.gethostname()}:{args.grpc_port}"


def _socket_path(folder: str, index: int) -> str:
    return f"unix:{Path(folder) / f'worker-{index}.sock'}"


class ReplicaSyncSetup:
    """The pieces of state sharing inside one `epp serve` process."""

    def __init__(
        self,
        args: argparse.Namespace,
        datastore: Datastore,
        control: RequestControl,
        registry: CollectorRegistry,
    ) -> None:
        self.args = args
        index = max(0, int(args.worker_index))
        self.origin = f"{_group(args)}/{index}"
        self.ledger = LocalLedger()
        prefix_index = control.scheduler.services.prefix_index
        self.hook = ReplicaSync(self.ledger, services=control.scheduler.services)
        control.hooks.append(self.hook)
        prefix_index.on_transit = self.ledger.set_transit  # P/D KV not landed yet
        precise = control.scheduler.services.precise
        if precise is not None:  # what this instance's picks sent, for the peers' exact index
            precise.on_speculate = self.ledger.add_precise
        self.view = PeerView(
            datastore,
            prefix_index,
            self.origin,
            latency=control.scheduler.services.latency,
            precise=control.scheduler.services.precise,
            expiry_s=args.sync_peer_timeout,
        )
        self.node = SyncNode(
            self.ledger,
            self.view,
            origin=self.origin,
            prefix_index=prefix_index,
            flush_interval=args.sync_flush_interval,
            snapshot_interval=args.sync_snapshot_interval,
        )
        self.metrics = SyncMetrics(self.node, registry)
        self.membership: StaticPeers | KubePeers | None = None
        self.ports: dict[str, int] = {}

    async def start(self) -> None:
        a = self.args
        listen: list[str] = []
        tcp = f"{a.bind_address}:{a.sync_port}"
        if _remote_sync(a):
            listen.append(tcp)
        local: list[str] = []
        if is_worker(a) and a.workers > 1:
            listen.append(_socket_path(a.sync_socket_dir, a.worker_index))
            local = [
                _socket_path(a.sync_socket_dir, i) for i in range(a.workers) if i != a.worker_index
            ]
        try:
            await self.node.start(listen, reuseport=is_worker(a))
        except RuntimeError:  # grpc says only "Failed to bind to address"
            raise SyncPortError(f"--sync-port: cannot listen on {', '.join(listen)}") from None
        if tcp in self.node.ports:
            self.ports["sync"] = self.node.ports[tcp]
        self.node.set_peers(local=local)
        if a.peers:
            self.membership = StaticPeers(self.node, a.peers.split(","))
        elif a.sync_service:
            namespace = a.sync_namespace or os.environ.get("POD_NAMESPACE") or a.pool_namespace
            own = {os.environ.get("POD_IP", "")}
            if a.bind_address not in ("0.0.0.0", "::", ""):
                own.add(a.bind_address)
            self.membership = KubePeers(
                self.node,
                a.sync_service,
                namespace,
                port_name=a.sync_port_name,
                own_ips=own,
                kubeconfig=a.kubeconfig,
            )
        if self.membership is not None:
            await self.membership.start()
        log.info(
            "state sync on",
            extra={"origin": self.origin, "listen": list(self.node.ports), "local_peers": local},
        )

    async def stop(self) -> None:
        if self.membership is not None:
            with contextlib.suppress(Exception):
                await self.membership.stop()
        await self.node.stop()

    async def debug(self, _: web.Request) -> web.Response:
        return web.json_response(self.node.describe())


# ---- worker supervisor -------------------------------------------------------------------
def _die_with_parent() -> None:
    """Child side of fork: get SIGTERM if the supervisor dies (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def supervise(args: argparse.Namespace) -> int:
    if not args.grpc_port:
        log.error("--workers needs a fixed --grpc-port (the workers share it)")
        return 2
    argv: list[str] = list(getattr(args, "raw_argv", None) or sys.argv[2:])
    own_dir = not args.sync_socket_dir
    folder = args.sync_socket_dir or tempfile.mkdtemp(prefix="epp-workers-")
    procs: dict[int, subprocess.Popen[bytes]] = {}
    restarts: dict[int, float] = {}
    stopping = False

    def spawn(i: int) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "epp.cli", "serve", *argv]
        cmd += ["--worker-index", str(i), "--sync-socket-dir", folder]
        return subprocess.Popen(cmd, preexec_fn=_die_with_parent)

    def on_signal(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("starting %d workers", args.workers, extra={"socket_dir": folder})
    for i in range(args.workers):
        procs[i] = spawn(i)
    try:
        while True:
            alive = 0
            for i, p in list(procs.items()):
                if p.poll() is None:
                    alive += 1
                    continue
                if stopping:
                    continue
                now = time.monotonic()
                if now - restarts.get(i, 0.0) < 1.0:
                    continue  # at most one restart per second per worker
                log.warning("worker %d exited with %s; restarting", i, p.returncode)
                restarts[i] = now
                procs[i] = spawn(i)
                alive += 1
            if stopping and alive == 0:
                break
            time.sleep(0.1)
    finally:
        if own_dir:
            shutil.rmtree(folder, ignore_errors=True)
    codes: list[Any] = [p.returncode for p in procs.values()]
    return 0 if all(c in (0, -signal.SIGTERM, -signal.SIGINT) for c in codes) else 1

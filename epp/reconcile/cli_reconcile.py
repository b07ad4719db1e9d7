"""`epp reconcile`: run the ModelPool reconciler (or one pass with `--once`).

As a service: `--health-port` serves `/healthz` (the process and its event loop are alive)
and `/readyz` (it reached the API server: leading, or a standby that reads the Lease), and
`--leader-elect` lets several replicas run with one active (`leader.py`). A leader that
cannot renew its Lease exits with status 1, so its pod restarts clean as a standby.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from typing import Any

from aiohttp import web

from epp import IMAGE
from epp.api.errors import UserError
from epp.reconcile.apply import FIELD_MANAGER, ApplySettings
from epp.reconcile.controller import Controller, reconcile_all
from epp.reconcile.kube import ApiError, Kube, path_for
from epp.reconcile.leader import LeaderElector, LeaseSettings

log = logging.getLogger("epp.reconcile")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", default="",
                        help="kubeconfig path (default: in-cluster, then $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("-n", "--namespace", default="", help="watch one namespace (default all)")
    parser.add_argument("--field-manager", default=FIELD_MANAGER,
                        help="server-side apply field manager name")
    parser.add_argument("--force-conflicts", action="store_true",
                        help="take over fields another applier owns instead of reporting them")
    parser.add_argument("--resync", type=float, default=30.0, help="seconds between full passes")
    parser.add_argument("--once", action="store_true", help="reconcile every pool once and exit")
    parser.add_argument("--epp-image", default="",
                        help="image of the pools' EPP Deployments, unless a ModelPool names "
                             f"its own (default: in a pod, the reconciler's own image; else {IMAGE})")
    parser.add_argument("--log-level", default="INFO", help="DEBUG | INFO | WARNING | ERROR")
    g = parser.add_argument_group("as a service")
    g.add_argument("--health-port", type=int, default=0,
                   help="HTTP /healthz and /readyz on this port (default: 0, off; "
                        "the manifests use 8081)")
    g.add_argument("--bind-address", default="127.0.0.1",
                   help="address of the health port (0.0.0.0 in a pod)")
    g.add_argument("--leader-elect", action="store_true",
                   help="reconcile only while holding a Lease, so several replicas can run "
                        "(default: off, one reconciler)")
    g.add_argument("--leader-election-namespace", default="",
                   help="namespace of the Lease (default: $POD_NAMESPACE, else default)")
    g.add_argument("--leader-election-id", default="epp-reconciler", help="name of the Lease")
    g.add_argument("--lease-duration", type=float, default=15.0,
                   help="seconds a standby waits for an unrenewed Lease before taking it")
    g.add_argument("--renew-deadline", type=float, default=10.0,
                   help="seconds the leader keeps trying to renew before it gives up")
    g.add_argument("--retry-period", type=float, default=2.0,
                   help="seconds between Lease renewals / acquisition attempts")


class _Health:
    def __init__(self) -> None:
        self.state = "starting"  # starting | standby | leader | running

    async def healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, _: web.Request) -> web.Response:
        return web.Response(status=503 if self.state == "starting" else 200,
                            text=self.state + "\n")


async def _serve_health(health: _Health, host: str, port: int) -> web.AppRunner:
    app = web.Application()
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        await runner.cleanup()
        raise UserError(f"--health-port: cannot listen on {host}:{port} "
                        f"({e.strerror or os.strerror(e.errno or 0)})") from None
    return runner


def _lease_settings(args: argparse.Namespace) -> LeaseSettings:
    who = os.environ.get("POD_NAME") or socket.gethostname()
    return LeaseSettings(
        namespace=args.leader_election_namespace or os.environ.get("POD_NAMESPACE") or "default",
        name=args.leader_election_id,
        identity=f"{who}_{uuid.uuid4().hex[:8]}",
        lease_duration=args.lease_duration,
        renew_deadline=args.renew_deadline,
        retry_period=args.retry_period,
    )


async def _lead(kube: Kube, args: argparse.Namespace, settings: ApplySettings,
                health: _Health, stop: asyncio.Event) -> int:
    """Stand by until the Lease is ours, reconcile while we hold it; 1 if it was lost."""
    elector = LeaderElector(kube, _lease_settings(args))
    health.state = "standby"
    tasks: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait(), name="stop")]
    try:
        acquire = asyncio.create_task(elector.acquire(), name="acquire")
        tasks.append(acquire)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if not acquire.done():
            return 0  # stopped while standing by
        health.state = "leader"
        hold = asyncio.create_task(elector.hold(), name="hold")
        controller = Controller(kube, args.namespace, settings, args.resync)
        tasks += [hold, asyncio.create_task(controller.run(stop), name="controller")]
        await asyncio.wait([t for t in tasks if t is not acquire],
                           return_when=asyncio.FIRST_COMPLETED)
        if hold.done() and not stop.is_set():
            log.error("lost leadership: exiting so that a fresh process stands by")
            return 1
        return 0
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await elector.release()


async def own_image(kube: Kube) -> str:
    """The image of the pod this process runs in ($POD_NAMESPACE/$POD_NAME), or ""."""
    ns, name = os.environ.get("POD_NAMESPACE"), os.environ.get("POD_NAME")
    if not (ns and name):
        return ""
    try:
        pod = await kube.get(path_for("v1", "pods", ns, name))
    except (ApiError, OSError) as e:
        log.warning("cannot read my own pod %s/%s (%s); EPPs get %s", ns, name, e, IMAGE)
        return ""
    containers = (pod.get("spec") or {}).get("containers") or []
    mine = next((c for c in containers if (c.get("args") or [""])[0] == "reconcile"),
                containers[0] if containers else {})
    return str(mine.get("image") or "")


async def _main(args: argparse.Namespace) -> int:
    kube = await Kube.connect(args.kubeconfig)
    epp_image = args.epp_image or await own_image(kube) or IMAGE
    settings = ApplySettings(args.field_manager, args.force_conflicts, epp_image)
    log.info("pools' EPP image: %s", epp_image)
    health = _Health()
    runner = None
    try:
        if args.once:
            results = await reconcile_all(kube, args.namespace, settings)
            for (ns, name), r in sorted(results.items()):
                state = "ok" if r.ok else f"{r.reason}: {r.message}"
                print(f"{ns}/{name}: {state} (moves={r.moves}, pruned={len(r.pruned)})")
            return 0 if all(r.ok for r in results.values()) else 1
        if args.health_port:
            runner = await _serve_health(health, args.bind_address, args.health_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if args.leader_elect:
            return await _lead(kube, args, settings, health, stop)
        health.state = "running"
        await Controller(kube, args.namespace, settings, args.resync).run(stop)
        return 0
    finally:
        if runner is not None:
            await runner.cleanup()
        await kube.close()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_main(args))

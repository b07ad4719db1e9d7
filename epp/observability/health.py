"""gRPC health (liveness, readiness, the ext_proc service) and the HTTP /metrics + /healthz."""

from __future__ import annotations

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AioHealthServicer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """Liveness is up while the process runs; readiness needs a synced datastore."""

    def __init__(self) -> None:
        self.servicer = AioHealthServicer()
        self.live = False
        self.ready = False

    async def set(self, *, live: bool, ready: bool) -> None:
        self.live, self.ready = live, ready
        await self.servicer.set("liveness", SERVING if live else NOT_SERVING)
        ready_status = SERVING if ready else NOT_SERVING
        for service in ("readiness", EXT_PROC_SERVICE, ""):
            await self.servicer.set(service, ready_status)

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)


def metrics_app(registry: CollectorRegistry, health: Health) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(
            text="ok" if health.live else "not live", status=200 if health.live else 503
        )

    async def readyz(_: web.Request) -> web.Response:
        return web.Response(
            text="ok" if health.ready else "not ready", status=200 if health.ready else 503
        )

    app = web.Application()  # access logs off: scraped every few seconds
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app

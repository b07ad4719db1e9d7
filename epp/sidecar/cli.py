"""`epp sidecar`: the P/D decode-pod sidecar (runs in front of the local engine)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from epp.observability.logging import setup_logging
from epp.sidecar.allowlist import AllowList, KubeAllowList, StaticAllowList
from epp.sidecar.connectors import CONNECTORS
from epp.sidecar.server import Sidecar, SidecarSettings

log = logging.getLogger("epp.sidecar")
_D = SidecarSettings()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Reverse proxy in front of a decode pod's engine. A request naming a prefill pod in "
        "x-prefiller-host-port is prefilled there (vLLM kv_transfer_params) and decoded "
        "locally; without the header it goes to the local engine unchanged."
    )
    g = p.add_argument_group("listening and the local engine")
    g.add_argument("--host", default=_D.host,
                   help="address to listen on (default: %(default)s; 0.0.0.0 in a pod)")
    g.add_argument("--port", type=int, default=_D.port,
                   help="serving port, the pod's port in the InferencePool (default: %(default)s)")
    g.add_argument("--engine-url", default=_D.engine_url,
                   help="the local engine, on its internal port (default: %(default)s)")
    g.add_argument("--metrics-port", type=int, default=_D.metrics_port,
                   help="also serve the sidecar's Prometheus metrics on this port at /metrics "
                        "(default: %(default)s = only /sidecar/metrics on --port)")
    g = p.add_argument_group("P/D protocol")
    g.add_argument("--connector", choices=sorted(CONNECTORS), default=_D.connector,
                   help="how the prefill pod is driven: nixlv2 = vLLM NixlConnector "
                        "kv_transfer_params, two-phase; sglang = SGLang bootstrap (prefill "
                        "and decode sent at once) (default: %(default)s)")
    g.add_argument("--sglang-bootstrap-port", type=int, default=_D.sglang_bootstrap_port,
                   help="sglang connector: the prefill pods' KV bootstrap port "
                        "(default: %(default)s)")
    g.add_argument("--prefill-timeout", type=float, default=_D.prefill_timeout_s,
                   help="seconds to wait for the prefill answer before decoding locally "
                        "(default: %(default)s)")
    g.add_argument("--prefill-connect-timeout", type=float,
                   default=_D.prefill_connect_timeout_s,
                   help="seconds to connect to a prefill pod (default: %(default)s)")
    g.add_argument("--engine-connect-timeout", type=float, default=_D.engine_connect_timeout_s,
                   help="seconds to connect to the local engine (default: %(default)s)")
    g.add_argument("--no-strip-client-kv-params", action="store_true",
                   help="keep kv_transfer_params a client sent on a request decoded locally "
                        "(default: removed, they would steer the engine's KV pull)")
    g = p.add_argument_group("which prefill pods may be dialled (SSRF guard)")
    g.add_argument("--allowed-prefill", default="",
                   help="standalone: comma list of IP, IP:port, CIDR or CIDR:port "
                        "(default: empty = refuse every prefill target)")
    g.add_argument("--pool-name", default="",
                   help="Kubernetes: allow the prefill pods of this InferencePool, watched "
                        "through the API (default: none)")
    g.add_argument("--pool-namespace", default=os.environ.get("POD_NAMESPACE", "default"),
                   help="namespace of --pool-name (default: $POD_NAMESPACE or 'default': "
                        "%(default)s)")
    g.add_argument("--kubeconfig", default="",
                   help="kubeconfig file (default: in-cluster config, then ~/.kube/config)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-body-bytes", type=int, default=_D.max_body_bytes,
                   help="largest request body accepted, else 413 (default: %(default)s)")
    g.add_argument("--max-header-bytes", type=int, default=_D.max_header_bytes,
                   help="longest request line / header line, else 400 (default: %(default)s)")
    g.add_argument("--max-headers", type=int, default=_D.max_headers,
                   help="most request headers, else 400 (default: %(default)s)")
    g = p.add_argument_group("logging")
    g.add_argument("--log-level", default="info",
                   help="debug | info | warning | error (default: %(default)s); info logs "
                        "one line per disaggregated request, fallbacks are warnings")
    g.add_argument("--log-format", choices=["json", "text"], default="json",
                   help="(default: %(default)s)")


def build(args: argparse.Namespace) -> tuple[SidecarSettings, AllowList]:
    if args.pool_name and args.allowed_prefill:
        raise ValueError("give --pool-name (Kubernetes) or --allowed-prefill, not both")
    settings = SidecarSettings(
        host=args.host,
        port=args.port,
        engine_url=args.engine_url,
        connector=args.connector,
        prefill_timeout_s=args.prefill_timeout,
        prefill_connect_timeout_s=args.prefill_connect_timeout,
        engine_connect_timeout_s=args.engine_connect_timeout,
        max_body_bytes=args.max_body_bytes,
        max_header_bytes=args.max_header_bytes,
        max_headers=args.max_headers,
        strip_client_kv_params=not args.no_strip_client_kv_params,
        metrics_port=args.metrics_port,
        sglang_bootstrap_port=args.sglang_bootstrap_port,
    )
    allow: AllowList
    if args.pool_name:
        allow = KubeAllowList(args.pool_name, args.pool_namespace, args.kubeconfig or None)
    else:
        allow = StaticAllowList.from_text(args.allowed_prefill)
    return settings, allow


async def serve(settings: SidecarSettings, allow: AllowList) -> None:
    if isinstance(allow, KubeAllowList):
        await allow.start()
    sidecar = Sidecar(settings, allow)
    try:
        await sidecar.start()
        log.info("sidecar listening", extra={
            "address": f"{settings.host}:{sidecar.port}", "engine": settings.engine_url,
            "connector": settings.connector, "allowed_prefill": allow.describe()})
        print("READY", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await sidecar.stop()
        if isinstance(allow, KubeAllowList):
            await allow.stop()


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format == "json")
    try:
        settings, allow = build(args)
    except ValueError as e:
        print(f"epp sidecar: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(settings, allow))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m epp.sidecar")
    add_arguments(parser)
    return run(parser.parse_args())

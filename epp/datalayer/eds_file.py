"""Keep a standalone Envoy's pool cluster in step with the datastore (file-based EDS).

Envoy's `override_host` load-balancing policy only routes to hosts its cluster knows, which
is what makes the EPP's fallback list (`ip:port,ip:port,...`) safe to retry on. In
Kubernetes the gateway builds that cluster from the InferencePool; a standalone Envoy
(manifests/gateway/envoy-standalone.yaml) reads it from the file this component writes:
a `DiscoveryResponse` with one `ClusterLoadAssignment`, replaced atomically (write + rename
in the same directory, which Envoy watches) whenever endpoints come or go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint

log = logging.getLogger(__name__)

CLA_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def render_eds(cluster: str, endpoints: list[tuple[str, int]]) -> dict[str, Any]:
    """The EDS document Envoy's `path_config_source` reads, for `(address, port)` pairs."""
    lb_endpoints = [
        {"endpoint": {"address": {"socket_address": {"address": a, "port_value": p}}}}
        for a, p in sorted(set(endpoints))
    ]
    return {
        "resources": [
            {
                "@type": CLA_TYPE,
                "cluster_name": cluster,
                "endpoints": [{"lb_endpoints": lb_endpoints}] if lb_endpoints else [],
            }
        ],
    }


def write_eds(path: Path, cluster: str, endpoints: list[tuple[str, int]]) -> None:
    """Replace `path` atomically (Envoy must never read a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(render_eds(cluster, endpoints), sort_keys=False))
    os.replace(tmp, path)


class EdsFileWriter:
    """Rewrites the EDS file when the datastore gains or loses endpoints (coalesced per
    event-loop turn, so a reload of many endpoints is one write)."""

    def __init__(self, datastore: Datastore, path: str, cluster: str = "pool") -> None:
        self._ds = datastore
        self.path = Path(path)
        self.cluster = cluster
        self._pending: asyncio.Handle | None = None
        self._listening = False
        self.writes = 0

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._listening:
            self._ds.on_endpoint_added(self._changed)
            self._ds.on_endpoint_removed(self._changed)
            self._listening = True
        self.write_now()

    async def stop(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    def _changed(self, _: Endpoint) -> None:
        if self._pending is None:
            with contextlib.suppress(RuntimeError):  # no running loop: next start() writes
                self._pending = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._pending = None
        self.write_now()

    def write_now(self) -> None:
        eps = [(ep.address, ep.port) for ep in self._ds.endpoints()]
        try:
            write_eds(self.path, self.cluster, eps)
        except OSError as e:
            log.error("cannot write the Envoy EDS file %s: %s", self.path, e)
            return
        self.writes += 1

"""Who the peers are: a fixed list (`--peers`), or the EPP's own Service in Kubernetes.

In Kubernetes the replicas find each other through the EndpointSlices of the EPP's Service
(`--sync-service`; label `kubernetes.io/service-name`): every address in them (ready or
not: a starting replica already takes state) with the port named `--sync-port-name`,
except this pod's own IP (`POD_IP` from the downward API; if it is missing, the receiver
tells a dialer that reached its own pod and the dialer stops). `discovery.k8s.io/v1`
(Kubernetes >= 1.21), else `v1beta1` (1.17-1.24; the project's 1.20 test API server).
Not core/v1 Endpoints: deprecated, and it refuses loopback addresses (the test cluster's
fake pod IPs). Read-only RBAC: get/list/watch on `endpointslices`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Iterable
from typing import cast

from kubernetes_asyncio import client

from epp.datalayer.endpoint import format_hostport
from epp.datalayer.kube_client import load_api_client
from epp.datalayer.kube_watch import ListCall, Obj, Reflector
from epp.sync.node import SyncNode

log = logging.getLogger(__name__)


class StaticPeers:
    """`--peers host:port,...`: the sync addresses of the other instances (listing this
    instance too is harmless: it is recognised and skipped)."""

    def __init__(self, node: SyncNode, peers: Iterable[str]) -> None:
        self.node = node
        self.peers = [p.strip() for p in peers if p.strip()]

    async def start(self) -> None:
        self.node.set_peers(remote=self.peers)

    async def stop(self) -> None:
        return None


def slice_addresses(obj: Obj, port_name: str, exclude_ips: frozenset[str]) -> list[str]:
    """Sync addresses ("ip:port") in one EndpointSlice (v1 or v1beta1: same fields)."""
    ports = obj.get("ports") or []
    port = next((p.get("port") for p in ports if p.get("name") == port_name), None)
    if port is None and len(ports) == 1 and not ports[0].get("name"):
        port = ports[0].get("port")
    if port is None:
        return []
    out = []
    for ep in obj.get("endpoints") or []:
        if ((ep.get("conditions") or {}).get("terminating")) is True:
            continue  # draining: it still pushes its load to us, it needs nothing from us
        for ip in ep.get("addresses") or []:
            if ip and ip not in exclude_ips:
                out.append(format_hostport(ip, int(port)))
    return out


class KubePeers:
    def __init__(
        self,
        node: SyncNode,
        service: str,
        namespace: str,
        *,
        port_name: str = "sync",
        own_ips: Iterable[str] = (),
        kubeconfig: str | None = None,
        api_client: client.ApiClient | None = None,
    ) -> None:
        self.node = node
        self.service = service
        self.namespace = namespace
        self.port_name = port_name
        self.own_ips = frozenset(ip for ip in own_ips if ip)
        self.kubeconfig = kubeconfig
        self._api = api_client
        self._own_api = api_client is None
        self._task: asyncio.Task[None] | None = None
        self.reflector: Reflector | None = None
        self.version = "v1"
        self._slices: dict[str, Obj] = {}
        self.peers: list[str] = []

    async def start(self) -> None:
        if self._api is None:
            self._api = await load_api_client(self.kubeconfig)
        self.version = await self._slice_version()
        custom = client.CustomObjectsApi(self._api)
        self.reflector = Reflector(
            "sync-endpointslices",
            cast(
                ListCall,
                functools.partial(
                    custom.list_namespaced_custom_object,
                    "discovery.k8s.io",
                    self.version,
                    self.namespace,
                    "endpointslices",
                    label_selector=f"kubernetes.io/service-name={self.service}",
                ),
            ),
            self._on_list,
            self._on_event,
        )
        self._task = asyncio.create_task(self.reflector.run(), name="kube-sync-endpointslices")

    async def _slice_version(self) -> str:
        """discovery.k8s.io/v1 where served, else v1beta1 (API discovery needs no RBAC)."""
        try:
            group = await client.ApisApi(self._api).get_api_versions()
            for g in group.groups or []:
                if g.name == "discovery.k8s.io":
                    served = {v.version for v in g.versions or []}
                    return "v1" if "v1" in served or not served else "v1beta1"
        except Exception as e:  # fall back to the GA version; the watch retries
            log.warning("API discovery failed (%s); assuming discovery.k8s.io/v1", e)
        return "v1"

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._own_api and self._api is not None:
            await self._api.close()
            self._api = None

    def _on_list(self, items: list[Obj]) -> None:
        self._slices = {(o.get("metadata") or {}).get("name", ""): o for o in items}
        self._update()

    def _on_event(self, etype: str, obj: Obj) -> None:
        name = (obj.get("metadata") or {}).get("name", "")
        if etype == "DELETED":
            self._slices.pop(name, None)
        else:
            self._slices[name] = obj
        self._update()

    def _update(self) -> None:
        found: set[str] = set()
        for obj in self._slices.values():
            found.update(slice_addresses(obj, self.port_name, self.own_ips))
        peers = sorted(found)
        if peers != self.peers:
            log.info("sync peers from Service %s/%s: %s", self.namespace, self.service, peers)
            self.peers = peers
        self.node.set_peers(remote=peers)

"""Who the peers are: a fixed list (`--peers`), or the EPP's own Service in Kubernetes.

In Kubernetes the replicas find each other through the core/v1 `Endpoints` object of the
EPP's Service (`--sync-service`): every address in it (ready or not: a starting replica
already takes state) with the port named `--sync-port-name`, except this pod's own IP
(`POD_IP` from the downward API; if it is missing, the receiver tells a dialer that reached
its own pod and the dialer stops). Read-only RBAC: get/list/watch on `endpoints`.
core/v1 Endpoints is what the 1.20 test API server serves (discovery.k8s.io/v1
EndpointSlice is GA from 1.21); it is deprecated but still served on current versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Iterable
from typing import Any, cast

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


def endpoints_addresses(obj: Obj, port_name: str, exclude_ips: frozenset[str]) -> list[str]:
    """Sync addresses ("ip:port") in a core/v1 Endpoints object."""
    out: list[str] = []
    for subset in obj.get("subsets") or []:
        ports = subset.get("ports") or []
        port = next((p.get("port") for p in ports if p.get("name") == port_name), None)
        if port is None and len(ports) == 1 and not ports[0].get("name"):
            port = ports[0].get("port")
        if port is None:
            continue
        for addr in [*(subset.get("addresses") or []), *(subset.get("notReadyAddresses") or [])]:
            ip = addr.get("ip")
            if ip and ip not in exclude_ips:
                out.append(format_hostport(ip, int(port)))
    return sorted(set(out))


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
        self.peers: list[str] = []

    async def start(self) -> None:
        if self._api is None:
            self._api = await load_api_client(self.kubeconfig)
        core = client.CoreV1Api(self._api)
        self.reflector = Reflector(
            "sync-endpoints",
            cast(
                ListCall,
                functools.partial(
                    core.list_namespaced_endpoints,
                    self.namespace,
                    field_selector=f"metadata.name={self.service}",
                ),
            ),
            self._on_list,
            self._on_event,
        )
        self._task = asyncio.create_task(self.reflector.run(), name="kube-sync-endpoints")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._own_api and self._api is not None:
            await self._api.close()
            self._api = None

    def _on_list(self, items: list[Obj]) -> None:
        mine = [o for o in items if (o.get("metadata") or {}).get("name") == self.service]
        self._set(mine[0] if mine else None)

    def _on_event(self, etype: str, obj: Obj) -> None:
        self._set(None if etype == "DELETED" else obj)

    def _set(self, obj: dict[str, Any] | None) -> None:
        peers = [] if obj is None else endpoints_addresses(obj, self.port_name, self.own_ips)
        if peers != self.peers:
            log.info("sync peers from Service %s/%s: %s", self.namespace, self.service, peers)
            self.peers = peers
        self.node.set_peers(remote=peers)

"""Which prefill targets the sidecar may dial (SSRF guard).

The `x-prefiller-host-port` header comes from the EPP, but anything that can reach the
decode pod can send it; so the sidecar only dials IP literals (never a name: no DNS, no
rebinding) that an allow-list accepts:

* `StaticAllowList`: `--allowed-prefill` entries `IP`, `IP:port`, `CIDR`, `CIDR:port`
  (`[v6]:port`, `[v6/64]:port` for IPv6 with a port);
* `KubeAllowList`: the prefill-capable pods (role `prefill` or `both`) of the sidecar's
  InferencePool, on the pool's target ports, watched through the API (read-only).

A refused target is never connected to; the caller answers 400 and counts it.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TargetRefused(Exception):
    """The header names a target the sidecar must not dial; `reason` is a metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Target:
    ip: IPAddress
    port: int

    @property
    def hostport(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"


def parse_target(value: str) -> Target:
    """`ip:port` or `[v6]:port` (the first entry of a comma list); names are refused."""
    text = value.split(",", 1)[0].strip()
    text = text.removeprefix("http://")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise TargetRefused("malformed", f"prefill target {value[:100]!r} is not ip:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise TargetRefused("malformed", f"prefill target port {port} is out of range")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise TargetRefused(
            "not_an_ip", f"prefill target {host[:100]!r} is not an IP address"
        ) from None
    return Target(ip, port)


class AllowList(Protocol):
    def allows(self, target: Target) -> bool: ...

    @property
    def ready(self) -> bool: ...

    def describe(self) -> str: ...


@dataclass(frozen=True, slots=True)
class _Rule:
    network: IPNetwork
    port: int | None

    def matches(self, t: Target) -> bool:
        return t.ip in self.network and (self.port is None or self.port == t.port)


def parse_rule(entry: str) -> _Rule:
    text = entry.strip()
    port: int | None = None
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"allow-list entry {entry!r}: bad [IPv6] form")
        text, port_text = inner, rest[1:]
        if port_text:
            port = int(port_text)
    elif text.count(":") == 1:
        text, port_text = text.split(":")
        port = int(port_text)
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"allow-list entry {entry!r}: port out of range")
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"allow-list entry {entry!r} must be an IP or CIDR (optionally :port)"
        ) from None
    return _Rule(network, port)


class StaticAllowList:
    """Fixed rules from the command line. An empty list allows nothing."""

    def __init__(self, entries: list[str]) -> None:
        self.rules = [parse_rule(e) for e in entries if e.strip()]

    @classmethod
    def from_text(cls, text: str) -> StaticAllowList:
        return cls([e for e in text.replace(" ", ",").split(",") if e])

    def allows(self, target: Target) -> bool:
        return any(r.matches(target) for r in self.rules)

    @property
    def ready(self) -> bool:
        return True

    def describe(self) -> str:
        if not self.rules:
            return "nothing (no --allowed-prefill)"
        return ", ".join(
            f"{r.network}" + (f" port {r.port}" if r.port is not None else "") for r in self.rules
        )


class KubeAllowList:
    """Prefill-capable pods of one InferencePool, on its target ports (watched)."""

    def __init__(self, pool_name: str, namespace: str, kubeconfig: str | None = None) -> None:
        from epp.datalayer.datastore import Datastore

        self.pool_name = pool_name
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self.datastore = Datastore()
        self._source: object | None = None

    async def start(self) -> None:
        from epp.datalayer.kube_source import KubeSource

        source = KubeSource(
            self.datastore, self.pool_name, self.namespace, kubeconfig=self.kubeconfig,
            endpoints_only=True,
        )
        self._source = source
        await source.start()

    async def stop(self) -> None:
        from epp.datalayer.kube_source import KubeSource

        if isinstance(self._source, KubeSource):
            await self._source.stop()
        self._source = None

    def allows(self, target: Target) -> bool:
        ep = self.datastore.get(target.hostport)
        return ep is not None and ep.can_prefill()

    @property
    def ready(self) -> bool:
        return self.datastore.synced

    def describe(self) -> str:
        return f"prefill pods of InferencePool {self.namespace}/{self.pool_name}"

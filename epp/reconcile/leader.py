"""Leader election for `epp reconcile --leader-elect` on a coordination.k8s.io/v1 Lease.

The same protocol as client-go's leader election: a candidate takes the Lease when it is
missing or when its holder has not renewed it for `lease_duration` (measured on the local
clock from when this candidate last saw the record change, so clocks need not agree); the
leader renews every `retry_period` and gives up leadership when it could not renew for
`renew_deadline`. Writes are optimistic (resourceVersion), so two candidates never both
win. On a clean stop the leader releases the Lease, and a standby takes over at once
instead of after `lease_duration`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from epp.reconcile.kube import ApiError, Kube, path_for

log = logging.getLogger(__name__)
LEASE_API = "coordination.k8s.io/v1"


@dataclass
class LeaseSettings:
    namespace: str
    name: str = "epp-reconciler"
    identity: str = ""
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


def _micro_time(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class LeaderElector:
    kube: Kube
    settings: LeaseSettings
    is_leader: bool = False
    holder: str = ""  # the last holder seen ("" = none)
    _observed: tuple[str, str] = ("", "")  # (holder, renewTime) last seen
    _observed_at: float = 0.0  # monotonic time it was first seen

    @property
    def path(self) -> str:
        s = self.settings
        return path_for(LEASE_API, "leases", s.namespace, s.name)

    def _lease(self, rv: str = "", transitions: int = 0, acquired: str = "") -> dict[str, Any]:
        s = self.settings
        now = _micro_time()
        meta: dict[str, Any] = {"name": s.name, "namespace": s.namespace}
        if rv:
            meta["resourceVersion"] = rv
        return {
            "apiVersion": LEASE_API,
            "kind": "Lease",
            "metadata": meta,
            "spec": {
                "holderIdentity": s.identity,
                "leaseDurationSeconds": max(1, round(s.lease_duration)),
                "acquireTime": acquired or now,
                "renewTime": now,
                "leaseTransitions": transitions,
            },
        }

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True if we hold the Lease afterwards."""
        s = self.settings
        try:
            live = await self.kube.get_or_none(self.path)
            if live is None:
                await self.kube.create(path_for(LEASE_API, "leases", s.namespace),
                                       self._lease())
                self.holder = s.identity
                return True
            spec = live.get("spec") or {}
            holder = str(spec.get("holderIdentity") or "")
            record = (holder, str(spec.get("renewTime") or ""))
            now = time.monotonic()
            if record != self._observed:
                self._observed, self._observed_at = record, now
            self.holder = holder
            duration = float(spec.get("leaseDurationSeconds") or s.lease_duration)
            if holder and holder != s.identity and now < self._observed_at + duration:
                return False  # someone else holds a live lease
            ours = holder == s.identity
            transitions = int(spec.get("leaseTransitions") or 0) + (0 if ours else 1)
            acquired = str(spec.get("acquireTime") or "") if ours else ""
            rv = str((live.get("metadata") or {}).get("resourceVersion") or "")
            await self.kube.replace(self.path, self._lease(rv, transitions, acquired))
            self.holder = s.identity
            return True
        except ApiError as e:
            if e.conflict:  # lost a race with another candidate
                return False
            log.warning("lease %s/%s: %s", s.namespace, s.name, e)
            return False
        except (OSError, TimeoutError) as e:
            log.warning("lease %s/%s: %s", s.namespace, s.name, e)
            return False

    async def acquire(self) -> None:
        """Wait until we are the leader."""
        s = self.settings
        while True:
            if await self.try_acquire_or_renew():
                break
            await asyncio.sleep(s.retry_period)
        self.is_leader = True
        log.info("leader election: %s leads (lease %s/%s)", s.identity, s.namespace, s.name)

    async def hold(self) -> None:
        """Renew until renewal fails for `renew_deadline`; then return (leadership lost)."""
        s = self.settings
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(s.retry_period)
            if await self.try_acquire_or_renew():
                last_ok = time.monotonic()
            elif self.holder not in ("", s.identity) or \
                    time.monotonic() - last_ok > s.renew_deadline:
                self.is_leader = False
                log.error("leader election: %s lost the lease (holder now %r)", s.identity,
                          self.holder)
                return

    async def release(self) -> None:
        """Give the Lease up (a standby takes over without waiting for it to expire)."""
        if not self.is_leader:
            return
        self.is_leader = False
        with contextlib.suppress(ApiError, OSError, TimeoutError):
            live = await self.kube.get_or_none(self.path)
            if live is None or (live.get("spec") or {}).get("holderIdentity") != \
                    self.settings.identity:
                return
            lease = self._lease(str(live["metadata"].get("resourceVersion") or ""),
                                int(live["spec"].get("leaseTransitions") or 0))
            lease["spec"].update({"holderIdentity": None, "leaseDurationSeconds": 1,
                                  "acquireTime": None, "renewTime": None})
            await self.kube.replace(self.path, lease)
            log.info("leader election: %s released the lease", self.settings.identity)

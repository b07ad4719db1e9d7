"""Replica sync: this instance's own charges, releases and prefix inserts, for its peers.

Charges exactly what in-flight accounting charges, into the sync ledger instead of the
endpoints (`epp.sync.ledger.LocalLedger`), and hands the ledger the prompt blocks the prefix
insert hook puts in the local index and the uncached tokens in-flight accounting charges
to the prefilling endpoint's fluid queue model (each replica's model then sees the whole
pool's prefill work, not only its own picks). The sync node sends the ledger to the other replicas
and worker processes, which add it to their own counts. Added by `epp serve` when state
sharing is on (`--peers`, `--sync-service`, `--workers`); not a scheduling choice, so not
in the config registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from epp.datalayer.endpoint import Endpoint, InFlight
from epp.requestcontrol.decision import Decision
from epp.requestcontrol.hooks.inflight import InFlightCharges
from epp.requestcontrol.lifecycle import LifecycleHook
from epp.scheduling.framework import PREDICTIONS
from epp.scheduling.services import Services
from epp.sync.ledger import LocalLedger


class ReplicaSync(InFlightCharges, LifecycleHook):
    type_name = "replica-sync"
    consumes: ClassVar[frozenset[str]] = frozenset({PREDICTIONS})

    def __init__(
        self,
        ledger: LocalLedger,
        name: str = "",
        params: Mapping[str, Any] | None = None,
        services: Services | None = None,
        *,
        share_prefix: bool = True,
    ) -> None:
        self.ledger = ledger
        self.share_prefix = share_prefix
        super().__init__(name, params, services)

    def counters(self, ep: Endpoint) -> InFlight:
        return self.ledger.counters(ep)

    def pre_request(self, d: Decision) -> None:
        self.charge(d)
        res = d.result
        self.ledger.add_prefill_charge(res.prefill or res.target, res.uncached_tokens)
        if self.share_prefix and res.prefix_hashes:
            if res.prefill is not None:
                self.ledger.add_prefix(res.prefill, res.prefix_hashes)
            self.ledger.add_prefix(res.target, res.prefix_hashes)

    def prefill_done(self, d: Decision) -> None:
        self.settle_prefill(d)

    def release(self, d: Decision) -> None:
        self.uncharge(d)

"""Prometheus metrics of replica state sync, read from the node at scrape time.

Staleness of a peer = seconds since its last batch (it sends at least one snapshot every
`--sync-snapshot-interval`); lag = the last batch's one-way delay from the peer's send to
this instance's apply (wall clocks: includes clock skew between hosts).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from epp.sync.node import SyncNode

_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class SyncMetrics(Collector):
    def __init__(self, node: SyncNode, registry: CollectorRegistry) -> None:
        self.node = node
        self.lag = Histogram(
            "epp_sync_apply_lag_seconds",
            "Delay from a peer sending a sync batch to this instance applying it.",
            buckets=_LAG_BUCKETS,
            registry=registry,
        )
        node.observe_lag = self.lag.observe
        registry.register(self)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        node = self.node
        view = node.view
        stale = view.staleness()
        peers = GaugeMetricFamily("epp_sync_peers", "Peers whose state is merged in.")
        peers.add_metric([], len(stale))
        max_stale = GaugeMetricFamily(
            "epp_sync_max_staleness_seconds",
            "Seconds since the least recently heard peer sent a batch (0 with no peers).",
        )
        max_stale.add_metric([], max(stale.values(), default=0.0))
        per = GaugeMetricFamily(
            "epp_sync_peer_staleness_seconds",
            "Seconds since each peer's last batch.",
            labels=["peer"],
        )
        lag = GaugeMetricFamily(
            "epp_sync_peer_lag_seconds",
            "One-way delay of each peer's last batch (send to apply).",
            labels=["peer"],
        )
        reqs = GaugeMetricFamily(
            "epp_sync_peer_inflight_requests",
            "Requests each peer has in flight (included in epp_inflight_requests).",
            labels=["peer"],
        )
        for origin, st in view.origins.items():
            per.add_metric([origin], stale.get(origin, 0.0))
            lag.add_metric([origin], st.lag_s)
            reqs.add_metric([origin], sum(v[0] for _, v in st.loads.values()))
        queued = GaugeMetricFamily(
            "epp_sync_peer_queue_size",
            "Requests waiting in the peers' flow-control queues, per priority band and business.",
            labels=["priority", "business"],
        )
        for (band, flow), (n, _) in sorted(view.queue_totals().items()):
            queued.add_metric([str(band), flow], n)
        yield from (peers, max_stale, per, lag, reqs, queued)
        s = node.stats
        sent = CounterMetricFamily(
            "epp_sync_batches_sent", "Sync batches sent, by kind.", labels=["kind"]
        )
        for kind, n in s.sent.items():
            sent.add_metric([kind], n)
        received = CounterMetricFamily(
            "epp_sync_batches_received", "Sync batches received, by outcome.", labels=["outcome"]
        )
        for outcome, n in s.received.items():
            received.add_metric([outcome], n)
        yield from (sent, received)
        for name, help_text, value in (
            ("epp_sync_bytes_sent", "Bytes of sync batches sent (all peers).", s.bytes_sent),
            ("epp_sync_relayed", "Remote batches relayed to sibling workers.", s.relayed),
            ("epp_sync_link_errors", "Failed or broken streams to peers.", s.link_errors),
            ("epp_sync_link_resets", "Peers too slow to take batches (resynced).", s.link_resets),
            ("epp_sync_peers_expired", "Peers dropped after going silent.", view.expired),
            (
                "epp_sync_gaps",
                "Batches missing in peers' sequences (repaired by snapshots).",
                view.gaps,
            ),
        ):
            c = CounterMetricFamily(name, help_text)
            c.add_metric([], value)
            yield c

"""Prometheus metrics. Names follow the Gateway API Inference Extension EPP where it has one.

Hot-path children (`.labels(...)`) are cached so a request costs a few dict lookups. Pool and
per-endpoint gauges are computed at scrape time by a collector reading the datastore, so
they cost the request path nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from epp import clock
from epp.datalayer.datastore import Datastore
from epp.observability.fasthist import FastCounter, FastHistogram

_LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
_REQUEST_BUCKETS = (0.005, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

PHASES = ("header_wait", "body_receive", "parse", "admission", "schedule", "respond")


class EppMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, pool_name: str = "") -> None:
        self.registry = registry or CollectorRegistry()
        self.pool_name = pool_name
        r = self.registry
        self.requests = FastCounter(
            "inference_objective_request_total",
            "Requests per model.",
            ["model_name", "target_model_name"],
            registry=r,
        )
        self.request_errors = Counter(
            "inference_objective_request_error_total",
            "Requests the EPP answered with an error, per model and error code.",
            ["model_name", "target_model_name", "error_code"],
            registry=r,
        )
        self.request_duration = FastHistogram(
            "inference_objective_request_duration_seconds",
            "End-to-end request latency seen by the EPP (pick to response end).",
            ["model_name", "target_model_name"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.ttft = FastHistogram(
            "inference_objective_time_to_first_byte_seconds",
            "Time from pick to the response headers of the model server.",
            ["model_name"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.input_tokens = Counter(
            "inference_objective_input_tokens_total",
            "Prompt tokens reported in response usage.",
            ["model_name"],
            registry=r,
        )
        self.cached_tokens = Counter(
            "inference_objective_cached_tokens_total",
            "Cached prompt tokens reported in response usage.",
            ["model_name"],
            registry=r,
        )
        self.output_tokens = Counter(
            "inference_objective_output_tokens_total",
            "Completion tokens reported in response usage.",
            ["model_name"],
            registry=r,
        )
        self.scheduler_e2e = FastHistogram(
            "inference_extension_scheduler_e2e_duration_seconds",
            "Scheduling cycle duration.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.plugin_duration = FastHistogram(
            "inference_extension_scheduler_plugin_duration_seconds",
            "Per-plugin processing time.",
            ["extension_point", "plugin_name"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = FastHistogram(
            "epp_overhead_seconds",
            "Time the EPP spends per request, by phase.",
            ["phase"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.picks = FastCounter(
            "epp_endpoint_picks_total",
            "Requests sent to each endpoint, by role in the decision.",
            ["endpoint", "role"],
            registry=r,
        )
        self.prefix_hits = FastHistogram(
            "inference_extension_prefix_indexer_hit_ratio",
            "Share of the prompt the picked endpoint is expected to have cached.",
            buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
            registry=r,
        )
        self.slo_predictions = Counter(
            "epp_slo_predicted_total",
            "Requests with SLO headers, by whether the pick was predicted to meet them.",
            ["met"],
            registry=r,
        )
        self.kv_cache_resets = Counter(
            "epp_kv_cache_resets_total",
            "Engine cache resets seen through KV events (prefix guesses dropped).",
            ["endpoint"],
            registry=r,
        )
        self.pd_decisions = FastCounter(
            "epp_pd_decisions_total",
            "Prefill/decode decisions on pools with prefill pods: disaggregated or local, "
            "and why (remote-faster, local-faster, below-threshold, no-prefill-endpoint...).",
            ["decision", "reason"],
            registry=r,
        )
        self.flow_requests = FastCounter(
            "epp_flow_control_requests_total",
            "Requests through flow control by outcome (dispatched, rejected, cancelled) and "
            "reason (immediate, queued; band_full, queue_full, ttl, unschedulable; client).",
            ["priority", "business", "outcome", "reason"],
            registry=r,
        )
        self.flow_wait = FastHistogram(
            "epp_flow_control_queue_wait_seconds",
            "Time requests waited in the EPP's flow-control queue, by how they left it.",
            ["priority", "business", "outcome"],
            buckets=_QUEUE_BUCKETS,
            registry=r,
        )
        self.config_reloads = Counter(
            "epp_config_reload_total",
            "Reloads of the --config-file at run time, by result (success, error).",
            ["result"],
            registry=r,
        )
        self.slo_requests = Counter(
            "epp_slo_requests_total",
            "Requests with an SLO header, by objective, business, SLO kind (ttft, tpot) and "
            "whether the latency the EPP observed met it (TTFT includes the queue wait).",
            ["objective", "business", "slo", "met"],
            registry=r,
        )
        self.prefix_prediction_error = Histogram(
            "epp_prefix_prediction_error_tokens",
            "|engine-reported cached prompt tokens - the EPP's prediction for the chosen "
            "endpoint| (responses with usage; mode = the index that predicted).",
            ["mode"],
            buckets=(0, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536),
            registry=r,
        )
        self.prefix_predictions = Counter(
            "epp_prefix_predictions_total",
            "Cached-token predictions checked against the engine's usage: exact (within one "
            "KV block), over or under.",
            ["mode", "outcome"],
            registry=r,
        )
        # Leak watch (bench/soak.py): process_resident_memory_bytes, process_open_fds, ...
        ProcessCollector(registry=r)
        Gauge("epp_asyncio_tasks", "Tasks alive on the EPP's event loop.", registry=r).set_function(
            _task_count
        )
        self.pd_outcomes = Counter(
            "epp_pd_outcomes_total",
            "Requests the EPP disaggregated, by what the decode pod's sidecar reported in "
            "x-epp-pd (disaggregated, local-fallback, prefill-error, rejected; no-sidecar = "
            "a success without the header: prefilled locally, silently; error = a failure "
            "without it). Needs response-header processing.",
            ["outcome"],
            registry=r,
        )
        access_log = Counter(
            "epp_access_log_responses_total",
            "With --response-from-access-log: the gateway's access-log entries matched to a "
            "request this EPP decided (matched), not decided here (unmatched: another "
            "replica's, an immediate error's), and requests released with no entry after "
            "their predicted end (missing).",
            ["outcome"],
            registry=r,
        )
        self.access_log = {o: access_log.labels(o) for o in ("matched", "unmatched", "missing")}
        self._phase = {p: self.overhead.labels(p) for p in PHASES}
        self._pd_children: dict[tuple[str, str], Any] = {}
        self._pd_outcome_children: dict[str, Any] = {}
        self._plugin_children: dict[tuple[str, str], Any] = {}
        self._children: dict[tuple[object, ...], Any] = {}
        self._pred_children: dict[tuple[str, str], Any] = {}

    def phase(self, name: str, seconds: float) -> None:
        self._phase[name].observe(seconds)

    def plugin_timer(self, kind: str, name: str, seconds: float) -> None:
        child = self._plugin_children.get((kind, name))
        if child is None:
            child = self._plugin_children[(kind, name)] = self.plugin_duration.labels(kind, name)
        child.observe(seconds)

    def pd_decision(self, decision: str, reason: str) -> None:
        child = self._pd_children.get((decision, reason))
        if child is None:
            child = self._pd_children[(decision, reason)] = self.pd_decisions.labels(
                decision, reason
            )
        child.inc()

    def prefix_prediction(self, mode: str, predicted: int, reported: int, block: int) -> None:
        err = reported - predicted
        key = (mode, "exact" if abs(err) < max(1, block) else "over" if err < 0 else "under")
        child = self._pred_children.get(key)
        if child is None:
            child = self._pred_children[key] = (
                self.prefix_predictions.labels(*key),
                self.prefix_prediction_error.labels(mode),
            )
        child[0].inc()
        child[1].observe(abs(err))

    def attach_precise_index(self, index: Any) -> None:
        """Per-endpoint gauges of the precise prefix index (computed at scrape time)."""
        self.registry.register(_PreciseCollector(index))

    def track_open_requests(self, count: Callable[[], float]) -> None:
        """`epp_open_requests`: scheduled requests not yet released, over all endpoints
        (including endpoints removed meanwhile); 0 when idle, or something leaks."""
        Gauge(
            "epp_open_requests",
            "Scheduled requests whose lifecycle has not ended yet.",
            registry=self.registry,
        ).set_function(count)

    def pd_outcome(self, outcome: str) -> None:
        child = self._pd_outcome_children.get(outcome)
        if child is None:
            if len(self._pd_outcome_children) >= 16:  # a header value, bound the labels
                outcome = "other"
            child = self._pd_outcome_children.setdefault(
                outcome, self.pd_outcomes.labels(outcome)
            )
        child.inc()

    def attach_speed_estimates(
        self, estimates: Callable[[], Iterable[tuple[str, float, float, bool]]]
    ) -> None:
        """Per-endpoint gauges of the latency model's speeds, read at scrape time from
        `estimates()`: (endpoint, decode ms per token, prefill tokens/s, measured)."""
        self.registry.register(_SpeedCollector(estimates))

    def attach_datastore(self, datastore: Datastore) -> None:
        self.registry.register(_PoolCollector(datastore, self.pool_name))

    def _child(self, metric: Any, *labels: object) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*(str(v) for v in labels))
        return child

    # ---- flow control (a FlowObserver) --------------------------------------------------------
    def dispatched(self, priority: int, business: str, wait_s: float, queued: bool) -> None:
        reason = "queued" if queued else "immediate"
        self._child(self.flow_requests, priority, business, "dispatched", reason).inc()
        self._child(self.flow_wait, priority, business, "dispatched").observe(wait_s)

    def rejected(self, priority: int, business: str, reason: str, wait_s: float) -> None:
        self._child(self.flow_requests, priority, business, "rejected", reason).inc()
        self._child(self.flow_wait, priority, business, "rejected").observe(wait_s)

    def cancelled(self, priority: int, business: str, wait_s: float) -> None:
        self._child(self.flow_requests, priority, business, "cancelled", "client").inc()
        self._child(self.flow_wait, priority, business, "cancelled").observe(wait_s)

    def attach_flow_queue(self, sizes: Callable[[], Mapping[tuple[int, str], int] | None]) -> None:
        """Report the queue size per band and business, read at scrape time."""
        self.registry.register(_QueueCollector(sizes))

    def slo(self, objective: str, business: str, kind: str, met: bool) -> None:
        self._child(self.slo_requests, objective, business, kind, "true" if met else "false").inc()


class _QueueCollector(Collector):
    def __init__(self, sizes: Callable[[], Mapping[tuple[int, str], int] | None]) -> None:
        self.sizes = sizes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "epp_flow_control_queue_size",
            "Requests waiting in the EPP's flow-control queue, per priority band and business.",
            labels=["priority", "business"],
        )
        for (priority, business), n in sorted((self.sizes() or {}).items()):
            g.add_metric([str(priority), business], n)
        yield g


class _SpeedCollector(Collector):
    def __init__(self, estimates: Callable[[], Iterable[tuple[str, float, float, bool]]]) -> None:
        self.estimates = estimates

    def collect(self) -> Iterator[GaugeMetricFamily]:
        source_help = (
            " source: measured (the engine's own token latencies, or true first tokens) or "
            "fleet (not measured: the fleet's speed, or the latencyPriors before any reading)."
        )
        decode = GaugeMetricFamily(
            "epp_endpoint_decode_ms_per_token",
            "The latency model's decode speed of each endpoint, one sequence alone." + source_help,
            labels=["endpoint", "source"],
        )
        prefill = GaugeMetricFamily(
            "epp_endpoint_prefill_tokens_per_second",
            "The latency model's prefill speed of each endpoint." + source_help,
            labels=["endpoint", "source"],
        )
        for key, decode_ms, prefill_tps, measured in self.estimates():
            labels = [key, "measured" if measured else "fleet"]
            decode.add_metric(labels, decode_ms)
            prefill.add_metric(labels, prefill_tps)
        yield decode
        yield prefill


class _PoolCollector(Collector):
    def __init__(self, datastore: Datastore, pool_name: str) -> None:
        self.datastore = datastore
        self.pool_name = pool_name

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        eps = self.datastore.endpoints()
        ready = [ep for ep in eps if ep.ready]
        name = self.pool_name
        pool_ready = GaugeMetricFamily(
            "inference_pool_ready_pods", "Ready endpoints in the pool.", labels=["name"]
        )
        pool_ready.add_metric([name], len(ready))
        kv = GaugeMetricFamily(
            "inference_pool_average_kv_cache_utilization",
            "Mean KV-cache utilisation of ready endpoints.",
            labels=["name"],
        )
        kv.add_metric([name], sum(e.metrics.kv_usage for e in ready) / len(ready) if ready else 0.0)
        queue = GaugeMetricFamily(
            "inference_pool_average_queue_size",
            "Mean waiting queue of ready endpoints.",
            labels=["name"],
        )
        queue.add_metric([name], sum(e.metrics.waiting for e in ready) / len(ready) if ready else 0)
        per_pod_queue = GaugeMetricFamily(
            "inference_pool_per_pod_queue_size",
            "Waiting queue per endpoint.",
            labels=["name", "model_server_pod"],
        )
        inflight = GaugeMetricFamily(
            "epp_inflight_requests",
            "Requests the EPP has in flight per endpoint.",
            labels=["endpoint", "business", "role"],
        )
        inflight_tokens = GaugeMetricFamily(
            "epp_inflight_tokens",
            "Estimated tokens the EPP has in flight per endpoint.",
            labels=["endpoint"],
        )
        down = GaugeMetricFamily(
            "epp_endpoint_down",
            "1 while the EPP skips the endpoint: reason unreachable (no connect, or the "
            "gateway had to retry elsewhere) or errors (a burst of 5xx).",
            labels=["endpoint", "reason"],
        )
        connect_failures = CounterMetricFamily(
            "epp_endpoint_connect_failures",
            "Times an endpoint was found unreachable (scraper or gateway retries).",
            labels=["endpoint"],
        )
        bursts = CounterMetricFamily(
            "epp_endpoint_error_bursts",
            "Times an endpoint was cooled off after consecutive 5xx answers.",
            labels=["endpoint"],
        )
        now = clock.now()
        for ep in eps:
            per_pod_queue.add_metric([name, ep.name or ep.key], ep.metrics.waiting)
            inflight.add_metric([ep.key, ep.business, ep.role], ep.inflight.requests)
            inflight_tokens.add_metric([ep.key], ep.inflight.tokens)
            h = ep.health
            if h.down(now):
                down.add_metric([ep.key, h.reason(now)], 1)
            if h.connect_failures:
                connect_failures.add_metric([ep.key], h.connect_failures)
            if h.error_bursts:
                bursts.add_metric([ep.key], h.error_bursts)
        yield from (pool_ready, kv, queue, per_pod_queue, inflight, inflight_tokens)
        yield from (down, connect_failures, bursts)


class _PreciseCollector(Collector):
    def __init__(self, index: Any) -> None:
        self.index = index

    def collect(self) -> Iterator[GaugeMetricFamily]:
        blocks = GaugeMetricFamily(
            "epp_precise_index_blocks",
            "KV blocks each endpoint holds according to its KV events.",
            labels=["endpoint"],
        )
        trusted = GaugeMetricFamily(
            "epp_precise_index_trusted",
            "1 when the EPP saw every KV event of the endpoint's cache (else the approximate "
            "index is used for it).",
            labels=["endpoint"],
        )
        for key, v in list(self.index.pods.items()):
            blocks.add_metric([key], len(v.blocks))
            trusted.add_metric([key], 1.0 if v.trusted else 0.0)
        yield from (blocks, trusted)


def _task_count() -> float:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # scraped from outside the event loop
        return float("nan")

"""The sidecar's Prometheus metrics (served on `/sidecar/metrics`, and `--metrics-port`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_PREFILL_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

# How a request was served; also the value of the `x-epp-pd` response header.
MODE_LOCAL = "local"  # no prefill target named: the local engine did everything
MODE_DISAGGREGATED = "disaggregated"  # prefilled remotely, decoded here
MODE_FALLBACK = "local-fallback"  # a prefill target was named but failed: decoded locally
MODE_REJECTED = "rejected"  # the named target is not allowed (400)
MODE_PREFILL_ERROR = "prefill-error"  # the prefill pod refused the request itself (4xx)
MODES = (MODE_LOCAL, MODE_DISAGGREGATED, MODE_FALLBACK, MODE_REJECTED, MODE_PREFILL_ERROR)


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "epp_sidecar_requests_total",
            "Inference requests by how they were served (local, disaggregated, "
            "local-fallback, rejected, prefill-error).",
            ["mode"],
            registry=r,
        )
        self.prefill_duration = Histogram(
            "epp_sidecar_prefill_duration_seconds",
            "Remote prefill time: request sent to the prefill pod until its "
            "kv_transfer_params are back.",
            buckets=_PREFILL_BUCKETS,
            registry=r,
        )
        self.transfers = Counter(
            "epp_sidecar_kv_transfers_total",
            "Requests whose decode started from KV prefilled on another pod, by connector.",
            ["connector"],
            registry=r,
        )
        self.fallbacks = Counter(
            "epp_sidecar_fallbacks_total",
            "Remote prefills that failed and were decoded locally instead, by reason.",
            ["reason"],
            registry=r,
        )
        self.prefill_errors = Counter(
            "epp_sidecar_prefill_errors_total",
            "Concurrent (SGLang-style) prefill requests that failed while the decode ran "
            "(no local fallback is possible there; the decode engine reports its own error).",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            "epp_sidecar_rejected_targets_total",
            "Prefill targets refused without connecting (SSRF guard), by reason.",
            ["reason"],
            registry=r,
        )
        self.cancelled = Counter(
            "epp_sidecar_cancelled_total",
            "Requests the client abandoned, by the phase they were in.",
            ["phase"],
            registry=r,
        )
        self.engine_errors = Counter(
            "epp_sidecar_engine_errors_total",
            "Requests the local engine could not be reached for (answered 502).",
            registry=r,
        )
        self._modes = {m: self.requests.labels(m) for m in MODES}

    def served(self, mode: str) -> None:
        self._modes[mode].inc()

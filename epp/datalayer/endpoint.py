"""One model-server endpoint (pod:port) and the live signals we keep about it.

Everything here is plain data mutated on the event loop thread; no locks are needed
because the EPP is single-threaded asyncio. Hot fields are slotted attributes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from epp import clock

ROLE_PREFILL = "prefill"
ROLE_DECODE = "decode"
ROLE_BOTH = "both"
RECENT_SENT = 16  # per endpoint: uncached tokens of the last requests sent (PrefillQueue)
UNASSIGNED_BUSINESS = "unassigned"

# Values other projects use for the same roles (llm-d: `llm-d.ai/role`).
_ROLE_ALIASES = {
    "prefill": ROLE_PREFILL,
    "decode": ROLE_DECODE,
    "both": ROLE_BOTH,
    "prefill-decode": ROLE_BOTH,
    "prefill_decode": ROLE_BOTH,
    "": ROLE_DECODE,
}


def normalize_role(value: str | None) -> str:
    """Map a role label value to prefill / decode / both; unlabelled pods decode."""
    if value is None:
        return ROLE_DECODE
    return _ROLE_ALIASES.get(value.strip().lower(), ROLE_DECODE)


@dataclass(slots=True)
class EngineMetrics:
    """Scraped model-server signals, filled by the rows of `engine_metrics.py`.
    `updated_at` is a monotonic timestamp (0 = never)."""

    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0  # 0..1
    block_size: int = 0
    num_blocks: int = 0
    running_loras: tuple[str, ...] = ()
    updated_at: float = 0.0
    scrape_errors: int = 0
    # Decode speed the engine itself reports: cumulative TPOT histogram sum/count as last
    # seen, and a recent mean (ms, EWMA over scrape deltas; 0 = unknown).
    tpot_sum: float = 0.0
    tpot_count: float = -1.0  # -1 = never scraped
    tpot_recent_ms: float = 0.0

    def age(self, now: float | None = None) -> float:
        if self.updated_at == 0.0:
            return float("inf")
        return (now if now is not None else clock.now()) - self.updated_at


@dataclass(slots=True)
class InFlight:
    """EPP-local accounting, updated at pick time and released at response end."""

    requests: int = 0
    tokens: int = 0  # estimated prompt + expected decode tokens of requests in flight
    prefill_requests: int = 0  # requests for which this endpoint is the prefill hop
    prefill_tokens: int = 0
    # Requests sent but whose first byte has not come back yet, and the uncached prompt
    # tokens they still have to prefill: the engine's prefill queue as the EPP sees it.
    pending_requests: int = 0
    pending_prefill_tokens: int = 0


@dataclass(slots=True)
class PrefillQueue:
    """Fluid model of the engine's prefill queue as the EPP fed it: uncached prompt tokens
    sent here and not yet prefilled, as of `backlog_at` (monotonic seconds); it drains at
    the endpoint's prefill rate (see epp.scheduling.latency_model). Unlike `InFlight` it is
    an estimate that decays with time, not a count that returns to zero."""

    backlog_tokens: float = 0.0
    backlog_at: float = 0.0
    # Only grows: a request's position in the queue, for the first-token correction.
    charged_total: float = 0.0
    # Recent pick rate (requests/s, decaying) and when the last pick happened.
    pick_rate: float = 0.0
    last_pick_at: float = 0.0
    # The scrape time up to which the EPP's deferred charges here were checked against the
    # engine's own request counts.
    reconciled_at: float = 0.0
    # Uncached prompt tokens of the last requests sent here, newest last: what the requests
    # the engine reports waiting (the newest, in a first-come queue) still have to prefill.
    recent_uncached: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_SENT))


@dataclass(slots=True)
class LatencyStats:
    """Online estimates learned from observed responses (EWMA, milliseconds)."""

    prefill_ms_per_token: float = 0.0  # 0 = no observation yet
    ttft_base_ms: float = 0.0
    tpot_ms: float = 0.0
    tpot_per_seq_ms: float = 0.0
    samples: int = 0
    # EWMA of the uncached prompt tokens of requests sent here (what a queued request
    # typically still has to prefill); 0 = nothing sent yet.
    uncached_tokens: float = 0.0
    # Decode speed from the engine's own token-latency histogram, counted only over scrape
    # windows in which no prefill the EPP sent was running there (a prefill chunk makes
    # that step, and so the histogram's mean, many times slower): ms, 0 = unknown. The
    # cumulative sum/count and scrape time last taken into account come with it.
    decode_tpot_ms: float = 0.0
    decode_tpot_at: float = 0.0
    # The most sequences the engine was seen running: its batch limit, once it is reached.
    max_running: float = 0.0
    tpot_seen_sum: float = 0.0
    tpot_seen_count: float = -1.0
    tpot_seen_at: float = 0.0


@dataclass(slots=True)
class EndpointHealth:
    """Evidence that an endpoint cannot serve right now (monotonic times; 0 = none).

    `unreachable_until`: the metrics scraper could not connect (set to +inf until a scrape
    succeeds again) or the gateway had to retry elsewhere / failed to connect (a hold that a
    good scrape clears early). `cool_off_until`: a burst of 5xx answers; only time ends it.
    The health filter stops picking the endpoint while either lies in the future."""

    unreachable_until: float = 0.0
    cool_off_until: float = 0.0
    consecutive_errors: int = 0  # 5xx answers in a row
    connect_failures: int = 0  # totals, exported as metrics
    error_bursts: int = 0

    def down(self, now: float) -> bool:
        return now < self.unreachable_until or now < self.cool_off_until

    def reason(self, now: float) -> str:
        if now < self.unreachable_until:
            return "unreachable"
        return "errors" if now < self.cool_off_until else ""


@dataclass(slots=True, eq=False)
class Endpoint:
    """A model-server target: one pod IP and one target port."""

    address: str
    port: int
    name: str = ""  # pod name (or a name from the endpoints file)
    namespace: str = ""
    model: str = ""  # label `model`; "" = serves whatever the request names
    business: str = UNASSIGNED_BUSINESS
    role: str = ROLE_DECODE
    engine: str = "vllm"  # vllm | sglang | trtllm | sim (datalayer/engine_metrics.py)
    labels: dict[str, str] = field(default_factory=dict)
    ready: bool = True
    metrics_port: int = 0  # 0 = same as port
    key: str = ""  # "ip:port", the value Envoy routes on
    metrics: EngineMetrics = field(default_factory=EngineMetrics)
    inflight: InFlight = field(default_factory=InFlight)
    queue: PrefillQueue = field(default_factory=PrefillQueue)
    latency: LatencyStats = field(default_factory=LatencyStats)
    served_models: frozenset[str] = frozenset()  # from /v1/models or labels; empty = unknown
    health: EndpointHealth = field(default_factory=EndpointHealth)
    max_model_len: int = 0  # context window from the engine's /v1/models (0 = unknown)

    def __post_init__(self) -> None:
        self.key = format_hostport(self.address, self.port)
        self.role = normalize_role(self.role)

    @property
    def metrics_url(self) -> str:
        port = self.metrics_port or self.port
        return f"http://{format_hostport(self.address, port)}/metrics"

    def can_decode(self) -> bool:
        return self.role != ROLE_PREFILL

    def can_prefill(self) -> bool:
        return self.role in (ROLE_PREFILL, ROLE_BOTH)

    def serves(self, model: str) -> bool:
        if self.served_models:
            return model in self.served_models
        return not self.model or self.model == model

    def identity(self) -> tuple[object, ...]:
        """What a source controls; two endpoints with the same identity need no update."""
        return (
            self.name,
            self.namespace,
            self.model,
            self.business,
            self.role,
            self.engine,
            self.ready,
            self.metrics_port,
            tuple(sorted(self.labels.items())),
            self.served_models,
        )


def format_hostport(address: str, port: int) -> str:
    if ":" in address and not address.startswith("["):
        return f"[{address}]:{port}"
    return f"{address}:{port}"

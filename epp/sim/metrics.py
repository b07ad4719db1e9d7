"""Engine counters and histograms, rendered as Prometheus text in vLLM or SGLang names."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0)


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, v: float, count: int = 1) -> None:
        """`count` observations of the same value `v`."""
        self.counts[bisect.bisect_left(self.buckets, v)] += count
        self.total += v * count
        self.n += count

    def render(self, name: str, labels: str) -> list[str]:
        out = []
        cum = 0
        for b, c in zip(self.buckets, self.counts, strict=False):
            cum += c
            out.append(f'{name}_bucket{{{labels},le="{b}"}} {cum}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.n}')
        out.append(f"{name}_sum{{{labels}}} {self.total}")
        out.append(f"{name}_count{{{labels}}} {self.n}")
        return out


@dataclass(slots=True)
class EngineStats:
    prefix_queries: int = 0
    prefix_hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_ok: int = 0
    requests_error: int = 0
    preemptions: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    queue: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    prefill: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))

    def observe_ttft(self, v: float) -> None:
        self.ttft.observe(v)

    def observe_itl(self, v: float) -> None:
        self.itl.observe(v)

    def observe_e2e(self, v: float) -> None:
        self.e2e.observe(v)

    def observe_queue(self, v: float) -> None:
        self.queue.observe(v)

    def observe_prefill(self, v: float) -> None:
        self.prefill.observe(v)


def render_vllm(
    stats: EngineStats,
    *,
    model: str,
    waiting: int,
    running: int,
    kv_usage: float,
    block_size: int,
    num_blocks: int,
) -> str:
    lb = f'model_name="{model}",engine="0"'
    lines = [
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{lb}}} {running}",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{lb}}} {waiting}",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{lb}}} {kv_usage}",
        "# TYPE vllm:gpu_cache_usage_perc gauge",
        f"vllm:gpu_cache_usage_perc{{{lb}}} {kv_usage}",
        "# TYPE vllm:cache_config_info gauge",
        f'vllm:cache_config_info{{block_size="{block_size}",enable_prefix_caching="True",'
        f'num_gpu_blocks="{num_blocks}",engine="0"}} 1.0',
        "# TYPE vllm:prefix_cache_queries_total counter",
        f"vllm:prefix_cache_queries_total{{{lb}}} {stats.prefix_queries}",
        "# TYPE vllm:prefix_cache_hits_total counter",
        f"vllm:prefix_cache_hits_total{{{lb}}} {stats.prefix_hits}",
        "# TYPE vllm:prompt_tokens_total counter",
        f"vllm:prompt_tokens_total{{{lb}}} {stats.prompt_tokens}",
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{{{lb}}} {stats.generation_tokens}",
        "# TYPE vllm:num_preemptions_total counter",
        f"vllm:num_preemptions_total{{{lb}}} {stats.preemptions}",
        "# TYPE vllm:request_success_total counter",
        f'vllm:request_success_total{{{lb},finished_reason="length"}} {stats.requests_ok}',
        "# TYPE vllm:time_to_first_token_seconds histogram",
        *stats.ttft.render("vllm:time_to_first_token_seconds", lb),
        "# TYPE vllm:inter_token_latency_seconds histogram",
        *stats.itl.render("vllm:inter_token_latency_seconds", lb),
        "# TYPE vllm:time_per_output_token_seconds histogram",
        *stats.itl.render("vllm:time_per_output_token_seconds", lb),
        "# TYPE vllm:e2e_request_latency_seconds histogram",
        *stats.e2e.render("vllm:e2e_request_latency_seconds", lb),
        "# TYPE vllm:request_queue_time_seconds histogram",
        *stats.queue.render("vllm:request_queue_time_seconds", lb),
        "# TYPE vllm:request_prefill_time_seconds histogram",
        *stats.prefill.render("vllm:request_prefill_time_seconds", lb),
    ]
    return "\n".join(lines) + "\n"


def render_sglang(
    stats: EngineStats,
    *,
    model: str,
    waiting: int,
    running: int,
    kv_usage: float,
    block_size: int,
    num_blocks: int,
) -> str:
    lb = f'model_name="{model}"'
    lines = [
        "# TYPE sglang:num_running_reqs gauge",
        f"sglang:num_running_reqs{{{lb}}} {running}",
        "# TYPE sglang:num_queue_reqs gauge",
        f"sglang:num_queue_reqs{{{lb}}} {waiting}",
        "# TYPE sglang:token_usage gauge",
        f"sglang:token_usage{{{lb}}} {kv_usage}",
        "# TYPE sglang:cache_config_info gauge",
        f'sglang:cache_config_info{{page_size="{block_size}",num_pages="{num_blocks}"}} 1.0',
        "# TYPE sglang:cache_hit_rate gauge",
        f"sglang:cache_hit_rate{{{lb}}} "
        f"{stats.prefix_hits / stats.prefix_queries if stats.prefix_queries else 0.0}",
        "# TYPE sglang:prompt_tokens_total counter",
        f"sglang:prompt_tokens_total{{{lb}}} {stats.prompt_tokens}",
        "# TYPE sglang:generation_tokens_total counter",
        f"sglang:generation_tokens_total{{{lb}}} {stats.generation_tokens}",
        "# TYPE sglang:time_to_first_token_seconds histogram",
        *stats.ttft.render("sglang:time_to_first_token_seconds", lb),
        "# TYPE sglang:inter_token_latency_seconds histogram",
        *stats.itl.render("sglang:inter_token_latency_seconds", lb),
        "# TYPE sglang:e2e_request_latency_seconds histogram",
        *stats.e2e.render("sglang:e2e_request_latency_seconds", lb),
    ]
    return "\n".join(lines) + "\n"

"""Which `/metrics` samples each model-server engine exposes, one table per engine.

A row maps samples on the page to a field of `EngineMetrics` (`epp/datalayer/endpoint.py`).
A new signal is one row here (per engine that has it) and the `EngineMetrics` field it
fills; the scorer that reads it is its own file. A new engine is one table in `ENGINES`
(and its name in `labels._ENGINE_ALIASES`).

Rows of one engine that fill the same field are alternatives: the first the page carries
wins (e.g. a renamed metric and its older name). A page is read with every table; the
endpoint's own engine comes first, then the others in `ENGINES` order, so a mislabelled
pod still gets its signals. Names from the Gateway API Inference Extension's model-server
protocol (docs/proposals/003-model-server-protocol) and the engines' docs.
"""

from __future__ import annotations

from dataclasses import dataclass

SUM = "sum"  # several series (per model_name, per data-parallel engine) add up
MAX = "max"  # the largest series counts (the fullest engine's KV use)


@dataclass(frozen=True, slots=True)
class Gauge:
    """The sample's value -> `field`. `where=(label, value)` keeps only matching series."""

    field: str
    name: str
    fold: str = SUM
    where: tuple[str, str] | None = None
    clamp: tuple[float, float] | None = None


@dataclass(frozen=True, slots=True)
class InfoLabels:
    """An info sample whose labels carry the values: `fields` = ((field, label), ...).
    Integer fields; the largest value over the series wins."""

    name: str
    fields: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class LabelList:
    """A comma-separated label of the series with the newest value (a timestamp) -> a
    tuple field (vLLM leaves old label sets on the page)."""

    field: str
    name: str
    label: str


@dataclass(frozen=True, slots=True)
class Histogram:
    """`<name>_sum` / `<name>_count` summed over series -> `<field>_sum`, `<field>_count`;
    the scraper turns their deltas into `<field>_recent_ms` (a recent mean, seconds -> ms)."""

    field: str
    name: str


Row = Gauge | InfoLabels | LabelList | Histogram

VLLM: tuple[Row, ...] = (
    Gauge("waiting", "vllm:num_requests_waiting"),
    Gauge("running", "vllm:num_requests_running"),
    Gauge("kv_usage", "vllm:kv_cache_usage_perc", MAX, clamp=(0.0, 1.0)),
    Gauge("kv_usage", "vllm:gpu_cache_usage_perc", MAX, clamp=(0.0, 1.0)),  # before 0.10
    InfoLabels("vllm:cache_config_info", (("block_size", "block_size"),
                                          ("num_blocks", "num_gpu_blocks"))),
    LabelList("running_loras", "vllm:lora_requests_info", "running_lora_adapters"),
    Histogram("tpot", "vllm:inter_token_latency_seconds"),
    Histogram("tpot", "vllm:time_per_output_token_seconds"),  # older name
)

SGLANG: tuple[Row, ...] = (
    Gauge("waiting", "sglang:num_queue_reqs"),
    Gauge("running", "sglang:num_running_reqs"),
    Gauge("kv_usage", "sglang:token_usage", MAX, clamp=(0.0, 1.0)),
    InfoLabels("sglang:cache_config_info", (("block_size", "page_size"),
                                            ("num_blocks", "num_pages"))),
)

# TensorRT-LLM: `trtllm-serve` names first, then the Triton backend's labelled gauges.
TRTLLM: tuple[Row, ...] = (
    Gauge("waiting", "trtllm_num_requests_waiting"),
    Gauge("waiting", "nv_trt_llm_request_metrics", where=("request_type", "waiting")),
    Gauge("running", "trtllm_num_requests_running"),
    Gauge("running", "nv_trt_llm_request_metrics", where=("request_type", "scheduled")),
    Gauge("kv_usage", "trtllm_kv_cache_utilization", MAX, clamp=(0.0, 1.0)),
    Gauge("kv_usage", "nv_trt_llm_kv_cache_block_metrics", MAX,
          where=("kv_cache_block_type", "fraction"), clamp=(0.0, 1.0)),
    Gauge("block_size", "trtllm_kv_cache_tokens_per_block", MAX),
    Gauge("block_size", "nv_trt_llm_kv_cache_block_metrics", MAX,
          where=("kv_cache_block_type", "tokens_per")),
    Gauge("num_blocks", "trtllm_kv_cache_max_blocks", MAX),
    Gauge("num_blocks", "nv_trt_llm_kv_cache_block_metrics", MAX,
          where=("kv_cache_block_type", "max")),
)

# Engine name (the pod's `engine-type` label, normalised) -> its table. The first is the
# default for unknown engines; the simulator speaks vLLM.
ENGINES: dict[str, tuple[Row, ...]] = {
    "vllm": VLLM,
    "sglang": SGLANG,
    "trtllm": TRTLLM,
}
# Fields that say the page is a model server's at all (a page with none is a failed scrape).
LOAD_FIELDS = ("waiting", "running", "kv_usage")

"""The per-engine metric tables: every engine fills the load signals, TensorRT-LLM's two
naming schemes parse, and a table row naming no `EngineMetrics` field is refused."""

from __future__ import annotations

import pytest

from epp.datalayer.endpoint import EngineMetrics
from epp.datalayer.engine_metrics import ENGINES, LOAD_FIELDS, Gauge, Histogram, InfoLabels
from epp.datalayer.labels import normalize_engine
from epp.datalayer.metrics_scraper import apply_metrics
from epp.datalayer.prom_parse import _Compiled, parse_metrics

TRTLLM_SERVE = b"""# HELP trtllm_num_requests_running Number of active requests
# TYPE trtllm_num_requests_running gauge
trtllm_num_requests_running{model_name="m",engine_type="trtllm"} 6.0
# TYPE trtllm_num_requests_waiting gauge
trtllm_num_requests_waiting{model_name="m",engine_type="trtllm"} 2.0
# TYPE trtllm_kv_cache_utilization gauge
trtllm_kv_cache_utilization{model_name="m",engine_type="trtllm"} 0.35
# TYPE trtllm_kv_cache_tokens_per_block gauge
trtllm_kv_cache_tokens_per_block{model_name="m",engine_type="trtllm"} 32.0
# TYPE trtllm_kv_cache_max_blocks gauge
trtllm_kv_cache_max_blocks{model_name="m",engine_type="trtllm"} 4096.0
"""

TRITON = b"""# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 3
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 512
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 3
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 4
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="tensorrt_llm",version="1"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm",version="1"} 1
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="free",model="tensorrt_llm",version="1"} 6239
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 6240
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.25
"""


def test_every_engine_table_fills_the_load_signals() -> None:
    for name, rows in ENGINES.items():
        fields = {getattr(r, "field", None) for r in rows}
        assert set(LOAD_FIELDS) <= fields, name
        assert normalize_engine(name) == name  # the pod label reaches its table


def test_trtllm_serve_page() -> None:
    p = parse_metrics(TRTLLM_SERVE, "trtllm")
    assert (p.waiting, p.running, p.kv_usage, p.block_size, p.num_blocks) == (
        2.0, 6.0, 0.35, 32, 4096
    )
    m = EngineMetrics()
    apply_metrics(m, p, 1.0)
    assert (m.waiting, m.running, m.block_size, m.num_blocks) == (2.0, 6.0, 32, 4096)
    assert isinstance(m.block_size, int)


def test_triton_labelled_gauges_pick_their_series() -> None:
    p = parse_metrics(TRITON, "trtllm")
    # request_type=waiting / scheduled only, not the sum of every request_type series
    assert (p.waiting, p.running, p.kv_usage) == (4.0, 3.0, 0.25)
    assert (p.block_size, p.num_blocks) == (64, 6240)
    # the same page under a wrong engine label still yields its signals
    assert parse_metrics(TRITON, "vllm").waiting == 4.0
    assert normalize_engine("triton") == normalize_engine("trtllm-serve") == "trtllm"


def test_rows_must_name_an_engine_metrics_field() -> None:
    with pytest.raises(TypeError, match="no 'queue_depth'"):
        _Compiled({"x": (Gauge("queue_depth", "x:q"),)})
    with pytest.raises(TypeError, match="of type int"):
        _Compiled({"x": (InfoLabels("x:info", (("kv_usage", "k"),)),)})
    with pytest.raises(TypeError, match="no 'ttft_sum'"):
        _Compiled({"x": (Histogram("ttft", "x:ttft_seconds"),)})
    with pytest.raises(ValueError, match="fold"):
        _Compiled({"x": (Gauge("waiting", "x:w", "avg"),)})

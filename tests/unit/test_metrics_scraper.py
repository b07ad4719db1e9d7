"""Metrics scraping: the narrow parser on realistic pages, and the scraper against real
aiohttp servers on 127.0.0.1. `python -m tests.unit.test_metrics_scraper` benches the parser."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence

import pytest
from aiohttp import web

from epp.datalayer.datastore import Datastore
from epp.datalayer.endpoint import Endpoint
from epp.datalayer.metrics_scraper import MetricsScraper, is_stale
from epp.datalayer.prom_parse import label, parse_labels, parse_metrics

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def vllm_metrics_page(
    waiting: float = 3,
    running: float = 7,
    kv: float = 0.42,
    block_size: int = 16,
    num_blocks: int = 8192,
    loras: tuple[str, ...] = ("sql-lora",),
    engines: tuple[str, ...] = ("0",),
    old_kv_name: bool = False,
) -> str:
    """A /metrics page shaped like vLLM 0.10 (V1 engine): ~300 lines."""
    lines: list[str] = []
    add = lines.append
    for gen in range(3):
        add(f'python_gc_objects_collected_total{{generation="{gen}"}} {1234.0 + gen}')
    add("# HELP python_info Python platform information")
    add("# TYPE python_info gauge")
    add(
        'python_info{implementation="CPython",major="3",minor="12",patchlevel="3",'
        'version="3.12.3"} 1.0'
    )
    for name, val in [
        ("process_virtual_memory_bytes", 3.2e10),
        ("process_resident_memory_bytes", 2.1e9),
        ("process_start_time_seconds", 1.7e9),
        ("process_cpu_seconds_total", 812.4),
        ("process_open_fds", 77.0),
        ("process_max_fds", 1048576.0),
    ]:
        add(f"# HELP {name} process metric")
        add(f"# TYPE {name} gauge")
        add(f"{name} {val}")
    lab = [f'engine="{e}",model_name="{MODEL}"' for e in engines]

    def gauge(name: str, val: float, help_: str = "gauge") -> None:
        add(f"# HELP {name} {help_}")
        add(f"# TYPE {name} gauge")
        for lb in lab:
            add(f"{name}{{{lb}}} {val}")

    def counter(name: str, val: float, extra: list[str] | None = None) -> None:
        add(f"# HELP {name} counter")
        add(f"# TYPE {name} counter")
        for lb in lab:
            for ex in extra or [""]:
                add(f"{name}_total{{{lb}{ex}}} {val}")
                add(f"{name}_created{{{lb}{ex}}} 1.7e9")

    def histogram(name: str, buckets: Sequence[float]) -> None:
        add(f"# HELP {name} histogram")
        add(f"# TYPE {name} histogram")
        for lb in lab:
            acc = 0
            for b in buckets:
                acc += 3
                add(f'{name}_bucket{{{lb},le="{b}"}} {float(acc)}')
            add(f'{name}_bucket{{{lb},le="+Inf"}} {float(acc)}')
            add(f"{name}_count{{{lb}}} {float(acc)}")
            add(f"{name}_sum{{{lb}}} 123.456")
            add(f"{name}_created{{{lb}}} 1.7e9")

    gauge(
        "vllm:num_requests_running",
        float(running),
        "Number of requests in model execution batches.",
    )
    gauge(
        "vllm:num_requests_waiting", float(waiting), "Number of requests waiting to be processed."
    )
    add("# HELP vllm:lora_requests_info Running stats on lora requests.")
    add("# TYPE vllm:lora_requests_info gauge")
    add(
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="",'
        'waiting_lora_adapters=""} 1.7e9'
    )
    add(
        f'vllm:lora_requests_info{{max_lora="4",running_lora_adapters="{",".join(loras)}",'
        'waiting_lora_adapters=""} 1.8e9'
    )
    gauge(
        "vllm:gpu_cache_usage_perc" if old_kv_name else "vllm:kv_cache_usage_perc",
        kv,
        "KV-cache usage.",
    )
    counter("vllm:num_preemptions", 0.0)
    counter("vllm:prefix_cache_queries", 98765.0)
    counter("vllm:prefix_cache_hits", 45678.0)
    counter("vllm:prompt_tokens", 1.2e6)
    counter("vllm:generation_tokens", 3.4e5)
    counter(
        "vllm:request_success",
        900.0,
        [f',finished_reason="{r}"' for r in ("stop", "length", "abort")],
    )
    tok = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    sec = [
        0.001,
        0.005,
        0.01,
        0.02,
        0.04,
        0.06,
        0.08,
        0.1,
        0.25,
        0.5,
        0.75,
        1.0,
        2.5,
        5.0,
        7.5,
        10.0,
        20.0,
        40.0,
    ]
    histogram("vllm:request_prompt_tokens", tok)
    histogram("vllm:request_generation_tokens", tok)
    histogram("vllm:iteration_tokens_total", tok)
    histogram("vllm:time_to_first_token_seconds", sec)
    histogram("vllm:time_per_output_token_seconds", sec)
    histogram("vllm:e2e_request_latency_seconds", sec)
    histogram("vllm:request_queue_time_seconds", sec)
    histogram("vllm:request_inference_time_seconds", sec)
    histogram("vllm:request_prefill_time_seconds", sec)
    histogram("vllm:request_decode_time_seconds", sec[:10])
    histogram("vllm:request_params_max_tokens", tok)
    add("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig")
    add("# TYPE vllm:cache_config_info gauge")
    for e in engines:
        add(
            f'vllm:cache_config_info{{block_size="{block_size}",cache_dtype="auto",calculate_kv_scales="False",'
            f'cpu_offload_gb="0",enable_prefix_caching="True",engine="{e}",gpu_memory_utilization="0.9",'
            f'is_attention_free="False",num_cpu_blocks="None",num_gpu_blocks="{num_blocks}",'
            f'num_gpu_blocks_override="None",prefix_caching_hash_algo="builtin",sliding_window="None",'
            f'swap_space="4",swap_space_bytes="4294967296"}} 1.0'
        )
    return "\n".join(lines) + "\n"


def sglang_metrics_page(
    queue: float = 2,
    running: float = 5,
    usage: float = 0.25,
    page_size: int = 1,
    num_pages: int = 50000,
) -> str:
    return (
        "# HELP sglang:num_running_reqs The number of running requests.\n"
        "# TYPE sglang:num_running_reqs gauge\n"
        f'sglang:num_running_reqs{{model_name="{MODEL}"}} {float(running)}\n'
        "# HELP sglang:num_queue_reqs The number of requests in the waiting queue.\n"
        "# TYPE sglang:num_queue_reqs gauge\n"
        f'sglang:num_queue_reqs{{model_name="{MODEL}"}} {float(queue)}\n'
        "# HELP sglang:token_usage The token usage.\n"
        "# TYPE sglang:token_usage gauge\n"
        f'sglang:token_usage{{model_name="{MODEL}"}} {usage}\n'
        "# HELP sglang:gen_throughput The generation throughput (token/s).\n"
        "# TYPE sglang:gen_throughput gauge\n"
        f'sglang:gen_throughput{{model_name="{MODEL}"}} 812.5\n'
        "# HELP sglang:cache_config_info cache config\n"
        "# TYPE sglang:cache_config_info gauge\n"
        f'sglang:cache_config_info{{num_pages="{num_pages}",page_size="{page_size}"}} 1.0\n'
    )


# ---- parser ---------------------------------------------------------------------------------
def test_realistic_vllm_page() -> None:
    page = vllm_metrics_page(waiting=3, running=7, kv=0.42, block_size=16, num_blocks=8192)
    assert len(page.splitlines()) >= 300
    p = parse_metrics(page.encode())
    assert (p.waiting, p.running, p.kv_usage) == (3.0, 7.0, 0.42)
    assert (p.block_size, p.num_blocks) == (16, 8192)
    assert p.running_loras == ("sql-lora",)  # the newest lora_requests_info series wins


def test_series_are_combined_per_signal() -> None:
    # Two data-parallel engines: counts add up, KV usage is the fullest engine's.
    page = vllm_metrics_page(waiting=2, running=3, kv=0.3, engines=("0", "1"))
    page = page.replace(
        'vllm:kv_cache_usage_perc{engine="1"', 'vllm:kv_cache_usage_perc{engine="9"'
    )
    page = page.replace(
        'vllm:kv_cache_usage_perc{engine="9",model_name="' + MODEL + '"} 0.3',
        'vllm:kv_cache_usage_perc{engine="9",model_name="' + MODEL + '"} 0.8',
    )
    p = parse_metrics(page.encode())
    assert (p.waiting, p.running, p.kv_usage) == (4.0, 6.0, 0.8)
    # Several model_name series (base model + adapters) are summed too.
    text = (
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{model_name="a"} 1\n'
        'vllm:num_requests_waiting{model_name="b"} 2.5\n'
    )
    assert parse_metrics(text.encode()).waiting == 3.5


def test_older_vllm_kv_name_and_missing_signals() -> None:
    p = parse_metrics(vllm_metrics_page(kv=0.9, old_kv_name=True).encode())
    assert p.kv_usage == 0.9
    p = parse_metrics(b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 4\n")
    assert p.running == 4.0
    assert p.waiting is None and p.kv_usage is None and p.block_size is None
    assert p.running_loras is None
    assert parse_metrics(b"# TYPE foo gauge\nfoo 1\n").empty
    assert parse_metrics(b"").empty


def test_sglang_page_and_engine_preference() -> None:
    p = parse_metrics(sglang_metrics_page(queue=2, running=5, usage=0.25).encode(), "sglang")
    assert (p.waiting, p.running, p.kv_usage, p.block_size, p.num_blocks) == (
        2.0,
        5.0,
        0.25,
        1,
        50000,
    )
    # Names are accepted whatever the engine label says ...
    assert parse_metrics(sglang_metrics_page(queue=9).encode(), "vllm").waiting == 9.0
    # ... and when a page carries both families the endpoint's engine decides.
    both = (vllm_metrics_page(waiting=1) + sglang_metrics_page(queue=8)).encode()
    assert parse_metrics(both, "vllm").waiting == 1.0
    assert parse_metrics(both, "sglang").waiting == 8.0


def test_pages_without_type_lines_and_odd_formatting() -> None:
    page = "\r\n".join(
        ln for ln in vllm_metrics_page(waiting=6).splitlines() if not ln.startswith("#")
    )
    p = parse_metrics(page.encode())
    assert (p.waiting, p.running, p.num_blocks) == (6.0, 7.0, 8192)
    # Sample timestamps, NaN values and a wanted sample outside its TYPE block.
    text = (
        "# TYPE other gauge\nother 1\n"
        "vllm:num_requests_waiting 5 1700000000000\n"
        "vllm:num_requests_running NaN\n"
        "vllm:kv_cache_usage_perc 1.5\n"
    )
    p = parse_metrics(text.encode())
    assert p.waiting == 5.0 and p.running is None
    assert p.kv_usage == 1.0  # clamped to 0..1


def test_label_helpers() -> None:
    raw = b'xblock_size="9",block_size="16",note="a \\"q\\" b",num_gpu_blocks="100"'
    assert label(raw, "block_size") == "16"  # not fooled by a longer key ending the same
    assert label(raw, "num_gpu_blocks") == "100"
    assert label(raw, "missing") is None
    assert label(b'k="x\\"y"', "k") == 'x"y'
    assert parse_labels('a="1", b="x\\\\y\\n", c="}"') == {"a": "1", "b": "x\\y\n", "c": "}"}
    line = b'vllm:cache_config_info{block_size="32",note="}",num_gpu_blocks="7"} 1.0\n'
    p = parse_metrics(b"# TYPE vllm:cache_config_info gauge\n" + line)
    assert (p.block_size, p.num_blocks) == (32, 7)


# ---- scraper against real HTTP servers ----------------------------------------------------------
class FakeEngine:
    """A /metrics endpoint on 127.0.0.x whose page, status and delay tests can change."""

    def __init__(self, page: str, address: str = "127.0.0.1") -> None:
        self.page = page
        self.status = 200
        self.delay = 0.0
        self.hits = 0
        self.address = address
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(status=self.status, text=self.page, content_type="text/plain")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.address, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def endpoint(self, engine: str = "vllm", target_port: int = 8000) -> Endpoint:
        ep = Endpoint(address=self.address, port=target_port, engine=engine)
        ep.metrics_port = self.port
        return ep


@pytest.fixture
async def engines() -> AsyncIterator[Callable[..., FakeEngine]]:
    started: list[FakeEngine] = []

    def make(page: str, address: str = "127.0.0.1") -> FakeEngine:
        eng = FakeEngine(page, address)
        started.append(eng)
        return eng

    yield make
    for eng in started:
        await eng.stop()


async def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_scrapes_vllm_and_sglang_endpoints(engines: Callable[..., FakeEngine]) -> None:
    v = engines(vllm_metrics_page(waiting=3, running=7, kv=0.42))
    s = engines(sglang_metrics_page(queue=2, running=5, usage=0.25), "127.0.0.2")
    await v.start()
    await s.start()
    ds = Datastore()
    ep_v = ds.upsert_endpoint("t", v.endpoint())
    scraper = MetricsScraper(ds, interval=0.02, timeout=0.5)
    await scraper.start()
    try:
        # Endpoints present at start and added later are both scraped.
        ep_s = ds.upsert_endpoint("t", s.endpoint(engine="sglang"))
        await wait_for(lambda: ep_v.metrics.updated_at > 0 and ep_s.metrics.updated_at > 0)
        assert (ep_v.metrics.waiting, ep_v.metrics.running, ep_v.metrics.kv_usage) == (3, 7, 0.42)
        assert (ep_v.metrics.block_size, ep_v.metrics.num_blocks) == (16, 8192)
        assert ep_v.metrics.running_loras == ("sql-lora",)
        assert (ep_s.metrics.waiting, ep_s.metrics.running, ep_s.metrics.kv_usage) == (2, 5, 0.25)
        assert (ep_s.metrics.block_size, ep_s.metrics.num_blocks) == (1, 50000)
        assert not scraper.is_stale(ep_v)
        # A change on the page shows up within a few intervals.
        v.page = vllm_metrics_page(waiting=11, running=2, kv=0.9)
        await wait_for(lambda: ep_v.metrics.waiting == 11)
        assert ep_v.metrics.kv_usage == 0.9
    finally:
        await scraper.stop()


async def test_failures_backoff_staleness_and_recovery(engines: Callable[..., FakeEngine]) -> None:
    eng = engines(vllm_metrics_page(waiting=4))
    await eng.start()
    ds = Datastore()
    ep = ds.upsert_endpoint("t", eng.endpoint())
    scraper = MetricsScraper(ds, interval=0.02, timeout=0.5, stale_after=0.3, max_backoff=0.3)
    await scraper.start()
    try:
        await wait_for(lambda: ep.metrics.updated_at > 0)
        eng.status = 500
        await wait_for(lambda: ep.metrics.scrape_errors >= 2)
        assert ep.metrics.waiting == 4  # last good values are kept
        await wait_for(lambda: is_stale(ep, stale_after=0.3))
        assert scraper.is_stale(ep)
        # Backoff: over 1 s a 20 ms scraper would hit ~50 times; backed off it hits far fewer.
        hits0 = eng.hits
        await asyncio.sleep(1.0)
        assert eng.hits - hits0 <= 12
        assert scraper.errors_total >= ep.metrics.scrape_errors
        # A page with none of the signals also counts as a failure.
        eng.status = 200
        eng.page = "# TYPE foo gauge\nfoo 1\n"
        errors = ep.metrics.scrape_errors
        await wait_for(lambda: ep.metrics.scrape_errors > errors)
        eng.page = vllm_metrics_page(waiting=9)
        await wait_for(lambda: ep.metrics.waiting == 9, timeout=2.0)
        assert ep.metrics.scrape_errors == 0
        assert not scraper.is_stale(ep)
    finally:
        await scraper.stop()


async def test_timeouts_and_refused_connections_never_raise(
    engines: Callable[..., FakeEngine],
) -> None:
    slow = engines(vllm_metrics_page())
    slow.delay = 0.4
    await slow.start()
    ds = Datastore()
    ep_slow = ds.upsert_endpoint("t", slow.endpoint())
    dead = Endpoint(address="127.0.0.1", port=1)  # nothing listens on port 1
    ds.upsert_endpoint("t", dead)
    scraper = MetricsScraper(ds, interval=0.02, timeout=0.1)
    await scraper.start()
    try:
        await wait_for(
            lambda: ep_slow.metrics.scrape_errors >= 2 and dead.metrics.scrape_errors >= 2
        )
        assert ep_slow.metrics.updated_at == 0 and math.isinf(ep_slow.metrics.age())
        assert all(not t.done() for t in scraper._tasks.values())  # loops still alive
    finally:
        await scraper.stop()


async def test_removed_endpoints_stop_being_scraped(engines: Callable[..., FakeEngine]) -> None:
    eng = engines(vllm_metrics_page())
    await eng.start()
    ds = Datastore()
    ep = ds.upsert_endpoint("t", eng.endpoint())
    scraper = MetricsScraper(ds, interval=0.02)
    await scraper.start()
    try:
        await wait_for(lambda: eng.hits >= 2)
        ds.remove_endpoint(ep.key)
        assert ep.key not in scraper.scraping
        await asyncio.sleep(0.05)
        hits = eng.hits
        await asyncio.sleep(0.2)
        assert eng.hits == hits
        # Re-adding the same ip:port starts a new scrape loop.
        ep2 = ds.upsert_endpoint("t", eng.endpoint())
        await wait_for(lambda: ep2.metrics.updated_at > 0)
    finally:
        await scraper.stop()
    assert scraper.scraping == frozenset()
    hits = eng.hits
    ds.upsert_endpoint("t", Endpoint(address="127.0.0.1", port=9, metrics_port=eng.port))
    await asyncio.sleep(0.1)
    assert eng.hits == hits  # a stopped scraper ignores new endpoints


def _bench() -> None:
    import timeit

    data = vllm_metrics_page().encode()
    lines = len(data.splitlines())
    n = 5000
    best = min(timeit.repeat(lambda: parse_metrics(data), number=n, repeat=5)) / n
    print(f"parse_metrics: {lines}-line / {len(data)}-byte vLLM page: {best * 1e6:.1f} us")


if __name__ == "__main__":
    _bench()

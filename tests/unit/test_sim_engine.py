"""Simulator engine behaviour: batching, chunked prefill, prefix caching, eviction, time scale,
P/D two-phase, KV events and failure injection — through the real HTTP API where it matters."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio

from epp.devstack.procs import free_port
from epp.sim import SimConfig, start_pool, stop_pool
from epp.sim.config import make_config
from epp.sim.engine import Engine, Request
from epp.sim.metrics import EngineStats
from epp.sim.pool import ServerHandle
from epp.sim.tokenizer import encode, render_chat

# Fast engine costs so tests take milliseconds, not model seconds.
FAST: dict[str, Any] = {
    "step_base_s": 0.002,
    "prefill_per_token_s": 0.000_01,
    "decode_per_seq_s": 0.0,
    "decode_per_ctx_token_s": 0.0,
    "api_overhead_s": 0.0,
    "host": "127.0.0.1",
    "port": 0,
}


_SYL = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "so", "du", "fa")
_PSEUDO = [a + b for a in _SYL for b in _SYL]  # each one token of the simulator's tokenizer


def words(n: int, tag: str = "w") -> str:
    """`n` words of 2 tokens each; a different `tag` gives a different text."""
    o = zlib.crc32(tag.encode())
    return " ".join(f"{_PSEUDO[(o + i) % 144]} {_PSEUDO[(o // 7 + 5 * i) % 144]}" for i in range(n))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def pool(**overrides: Any) -> list[ServerHandle]:
    return await start_pool([make_config(**{**FAST, **overrides})])


async def complete(
    http: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int = 4, **extra: Any
) -> tuple[int, dict[str, Any], dict[str, str]]:
    body = {"prompt": prompt, "max_tokens": max_tokens, **extra}
    async with http.post(url + "/v1/completions", json=body) as r:
        return r.status, await r.json(), dict(r.headers)


async def test_prefix_cache_hits_show_in_cached_tokens(http: aiohttp.ClientSession) -> None:
    (h,) = await pool()
    try:
        system = words(200)  # 400 tokens = 25 full blocks
        _, first, headers = await complete(http, h.url, system + " question one")
        _, second, _ = await complete(http, h.url, system + " another question")
        assert headers["x-sim-server"] == h.address
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == 400  # the shared 25 blocks, nothing more
        async with http.get(h.url + "/metrics") as r:
            text = await r.text()
        assert "vllm:prefix_cache_hits_total" in text and " 400" in text
        assert 'vllm:cache_config_info{block_size="16"' in text
    finally:
        await stop_pool([h])


async def test_lru_eviction_of_free_blocks(http: aiohttp.ClientSession) -> None:
    # 40 blocks of 16 tokens: one 400-token prompt (25 blocks + output) fits, two do not.
    (h,) = await pool(num_gpu_blocks=40)
    try:
        a, b = words(200, "a"), words(200, "b")
        await complete(http, h.url, a)
        _, again, _ = await complete(http, h.url, a)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        await complete(http, h.url, b)  # needs blocks: evicts a's least recently used
        _, after, _ = await complete(http, h.url, a)
        assert after["usage"]["prompt_tokens_details"]["cached_tokens"] < 400
    finally:
        await stop_pool([h])


async def test_continuous_batching_vs_serial() -> None:
    async def steps_for(max_num_seqs: int) -> int:
        cfg = make_config(**{**FAST, "max_num_seqs": max_num_seqs})
        engine = Engine(cfg, EngineStats())
        engine.start()
        reqs = [Request(prompt_ids=encode(words(10, f"r{i}")), max_tokens=8) for i in range(4)]
        for r in reqs:
            engine.add(r)
        for r in reqs:
            while await r.next_tokens():
                pass
        await engine.stop()
        assert all(r.num_output == 8 and r.error is None for r in reqs)
        return engine.steps

    batched, serial = await steps_for(4), await steps_for(1)
    assert batched == 8  # all four prefill in step 1, then decode together
    assert serial == 32


async def test_chunked_prefill_respects_token_budget() -> None:
    cfg = make_config(**{**FAST, "max_num_batched_tokens": 256})
    engine = Engine(cfg, EngineStats())
    engine.start()
    req = Request(prompt_ids=encode(words(500)), max_tokens=2)  # 1000 tokens
    engine.add(req)
    while await req.next_tokens():
        pass
    await engine.stop()
    assert engine.steps == 4 + 1  # ceil(1000/256) prefill chunks, then one decode step


async def test_time_scale_stretches_wall_time(http: aiohttp.ClientSession) -> None:
    async def e2e(scale: float) -> float:
        (h,) = await pool(step_base_s=0.01, time_scale=scale)
        try:
            t0 = time.monotonic()
            await complete(http, h.url, words(20), max_tokens=5)
            return time.monotonic() - t0
        finally:
            await stop_pool([h])

    fast, slow = await e2e(1.0), await e2e(4.0)
    assert 0.04 <= fast < 0.15  # 5 steps of 10 ms
    assert slow > 3 * fast


async def test_prefill_decode_two_phase(http: aiohttp.ClientSession) -> None:
    pre, dec = await start_pool(
        [make_config(**{**FAST, "role": "prefill"}), make_config(**{**FAST, "role": "decode"})]
    )
    try:
        prompt = words(100)
        kvp = {"do_remote_decode": True, "do_remote_prefill": False}
        _, p, _ = await complete(http, pre.url, prompt, max_tokens=1, kv_transfer_params=kvp)
        params = p["kv_transfer_params"]
        assert params["do_remote_prefill"] is True
        assert params["remote_host"] == "127.0.0.1" and params["remote_port"] == pre.config.port
        _, d, _ = await complete(http, dec.url, prompt, max_tokens=6, kv_transfer_params=params)
        assert d["usage"]["completion_tokens"] == 6
        # The decode pod computed only the last prompt token itself.
        assert d["usage"]["prompt_tokens_details"]["cached_tokens"] == 199
        assert dec.server.stats.prefix_hits == 0
    finally:
        await stop_pool([pre, dec])


async def test_kv_events_published_in_vllm_format(http: aiohttp.ClientSession) -> None:
    kv_port = free_port()
    (h,) = await start_pool(
        [make_config(**{**FAST, "port": free_port(), "kv_events_port": kv_port})]
    )
    ctx = zmq.asyncio.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sub.connect(f"tcp://127.0.0.1:{kv_port}")
    try:
        await asyncio.sleep(0.2)  # slow-joiner
        await complete(http, h.url, words(16))  # 32 tokens = 2 blocks
        topic, seq, payload = await asyncio.wait_for(sub.recv_multipart(), 5)
        assert topic == f"kv@{h.config.address}@{h.config.model}".encode()
        assert len(seq) == 8
        _ts, events, _rank = msgpack.unpackb(payload)
        stored = [e for e in events if e[0] == "BlockStored"]
        assert stored and stored[0][2] is None  # first block has no parent
        assert stored[0][4] == 16 and len(stored[0][3]) == 16
    finally:
        sub.close(linger=0)
        await stop_pool([h])


async def test_failure_injection(http: aiohttp.ClientSession) -> None:
    (bad,) = await pool(error_rate=1.0)
    (full,) = await pool(max_waiting=1, max_num_seqs=1, step_base_s=0.02)
    try:
        status, body, _ = await complete(http, bad.url, "hello")
        assert status == 500 and body["error"]["code"] == 500
        results = await asyncio.gather(*(complete(http, full.url, f"hi {i}") for i in range(6)))
        statuses = sorted(s for s, _, _ in results)
        assert 429 in statuses and 200 in statuses
    finally:
        await stop_pool([bad, full])


async def test_dies_and_comes_back(http: aiohttp.ClientSession) -> None:
    (h,) = await start_pool(
        [make_config(**{**FAST, "port": free_port(), "die_after_s": 0.3, "down_for_s": 0.4})]
    )
    try:
        assert (await complete(http, h.url, "before"))[0] == 200
        await asyncio.sleep(0.4)
        with pytest.raises(aiohttp.ClientConnectionError):
            await complete(http, h.url, "while dead")
        # Back after down_for_s; on a loaded box the restart may take longer, so poll.
        deadline = asyncio.get_running_loop().time() + 5.0
        while True:
            await asyncio.sleep(0.1)
            try:
                assert (await complete(http, h.url, "after"))[0] == 200
                break
            except aiohttp.ClientConnectionError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
    finally:
        await stop_pool([h])


async def test_multi_turn_reply_reuses_cache(http: aiohttp.ClientSession) -> None:
    (h,) = await pool()
    try:
        msgs: list[dict[str, str]] = [{"role": "user", "content": words(60)}]
        async with http.post(
            h.url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 40}
        ) as r:
            reply = (await r.json())["choices"][0]["message"]["content"]
        msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "more"}]
        async with http.post(
            h.url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 4}
        ) as r:
            usage = (await r.json())["usage"]
        first_turn = len(encode(render_chat(msgs[:1])))
        # Cached past the first prompt: the previous reply's blocks were cached too.
        assert usage["prompt_tokens_details"]["cached_tokens"] > first_turn + 16
    finally:
        await stop_pool([h])


def test_config_rejects_non_loopback() -> None:
    from epp.sim.config import expand_servers

    assert expand_servers(3, "127.0.0.2", 8000)[-1] == ("127.0.0.4", 8000)
    with pytest.raises(ValueError):
        expand_servers(2, "10.0.0.1", 8000)
    with pytest.raises(ValueError):
        SimConfig(role="teacher").validate()

"""Precise prefix routing end to end: simulated vLLM pods publishing KV events over ZMQ, the
EPP with the same tokenizer behind real Envoy. The EPP's predicted cached tokens on the
chosen pod must equal what the engine reports in `usage` (within one block) for >= 99% of
requests after warm-up, through forced evictions and a pod restart, with an EPP that
started after the pods had already cached prompts."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from typing import Any

import aiohttp
import orjson

from epp.devstack.procs import free_port, stop_process, wait_http
from epp.sim.tokenizer import DATA_DIR
from tests.integration.conftest import ROOT, GatewayFactory
from tests.integration.helpers import metric_samples, post

IPS = ["127.0.9.11", "127.0.9.12", "127.0.9.13"]
MODEL = "m"
CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters:
    tokenProcessorConfig: {blockSize: 16}
- type: inflight-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: precise-prefix-cache-scorer
    weight: 2
  - pluginRef: inflight-scorer
  - pluginRef: max-score-picker
"""
WORDS = ["kalo", "mine", "ruta", "vozi", "pedu", "sofa", "zine", "tafa", "mika", "lone"]


def spawn_sim(ip: str, port: int, kv_port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "epp.sim", "--servers", "1", "--base-ip", ip, "--port", str(port),
         "--model", MODEL, "--time-scale", "0.05", "--kv-events-port", str(kv_port),
         "--kv-events-replay-port", str(kv_port + 1), "--num-gpu-blocks", "300",
         "--max-num-seqs", "8"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


async def predictions(gw: Any) -> dict[tuple[str, str], float]:
    samples = metric_samples(await gw.metrics_text(), "epp_prefix_predictions_total")
    return {(s["mode"], s["outcome"]): v for s, v in samples}


def delta(
    after: dict[tuple[str, str], float], before: dict[tuple[str, str], float]
) -> dict[tuple[str, str], float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


async def test_predicted_cached_tokens_match_the_engines(gateway: GatewayFactory) -> None:
    port, kv_port = free_port(IPS[0]), free_port(IPS[0])  # replay on kv_port + 1
    sims = {ip: spawn_sim(ip, port, kv_port) for ip in IPS}
    rng = random.Random(11)
    # 8 system prompts of 400-900 tokens; each pod caches 300 blocks = 4800 tokens: the
    # groups do not all fit, engines evict.
    systems = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(400, 900))) for _ in range(8)]
    try:
        for ip in IPS:
            await wait_http(f"http://{ip}:{port}/health", proc=sims[ip])
        # The pods serve before the EPP exists: it starts late and must learn their caches
        # from their replay sockets (the stream from sequence 0).
        async with aiohttp.ClientSession() as s:
            for k, ip in enumerate(IPS * 2):
                msgs = [{"role": "system", "content": systems[k % len(systems)]},
                        {"role": "user", "content": "kalo mine"}]  # fmt: skip
                body = {"model": MODEL, "max_tokens": 4, "messages": msgs}
                async with s.post(f"http://{ip}:{port}/v1/chat/completions", json=body) as r:
                    assert r.status == 200
        epp_args = ["--kv-events-port", str(kv_port), "--kv-events-replay-port",
                    str(kv_port + 1), "--tokenizer-dir", str(DATA_DIR)]  # fmt: skip
        gw = await gateway(
            [{"address": ip, "port": port, "labels": {"model": MODEL}} for ip in IPS],
            config_text=CONFIG,
            epp_args=epp_args,
            response_body=True,
        )

        async def one(i: int) -> None:
            body = {
                "model": MODEL,
                "max_tokens": 4,
                "messages": [
                    {"role": "system", "content": systems[rng.randrange(len(systems))]},
                    {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(30))},
                ],
            }
            status, _, raw = await post(gw, body, path="/v1/chat/completions")
            assert status == 200, raw

        async def batch(n: int, concurrency: int = 2) -> None:
            for start in range(0, n, concurrency):
                await asyncio.gather(*(one(start + k) for k in range(concurrency)))
                await asyncio.sleep(0.02)  # events of finished requests arrive

        await batch(30)  # warm-up: subscriptions connected, every pod seen from sequence 0
        before = await predictions(gw)
        await batch(120)
        # A pod restarts: a new engine (empty cache) with a new publisher (sequence 0).
        stop_process(sims[IPS[0]])
        sims[IPS[0]] = spawn_sim(IPS[0], port, kv_port)
        await wait_http(f"http://{IPS[0]}:{port}/health", proc=sims[IPS[0]])
        await batch(120)
        after = await predictions(gw)
        got = delta(after, before)
        total = sum(got.values())
        exact = sum(v for (_, outcome), v in got.items() if outcome == "exact")
        assert total >= 235, got  # every response's usage was checked
        assert got.get(("precise", "exact"), 0.0) >= 0.95 * total, got  # from the KV events
        assert exact / total >= 0.99, got

        evictions = 0
        async with aiohttp.ClientSession() as s:
            for ip in IPS:
                async with s.get(f"http://{ip}:{port}/sim/state") as r:
                    evictions += orjson.loads(await r.read())["evictions"]
        assert evictions > 100  # the engines really evicted (KV pressure)
        trusted = metric_samples(await gw.metrics_text(), "epp_precise_index_trusted")
        assert sorted(lbl["endpoint"] for lbl, v in trusted if v == 1.0) == sorted(
            f"{ip}:{port}" for ip in IPS
        )
    finally:
        for p in sims.values():
            stop_process(p)

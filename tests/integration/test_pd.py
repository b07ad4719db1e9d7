"""Prefill/decode disaggregation end to end: Envoy -> EPP -> decode-pod sidecar -> engines.

Two prefill simulators (one process, so a test can kill them) and two decode simulators
(another process), an `epp sidecar` process in front of each decode one, `epp serve` with
`--debug-decisions`, and Envoy. What the engines did is read from their own counters
(`/sim/state`), not from the proxy's word.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from bench.scenarios.workload import text_of
from epp.devstack.procs import free_port, stop_process, wait_http
from epp.devstack.sidecars import SidecarHandle, pd_endpoints, start_sidecars, stop_sidecars
from epp.devstack.stack import GatewayHandle, start_gateway
from tests.integration.helpers import metric_samples, wait_inflight_zero

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODEL = "pd-model"
PREFILL_IPS = ["127.0.8.2", "127.0.8.3"]
DECODE_IPS = ["127.0.8.4", "127.0.8.5"]
OUTSIDER_IP = "127.0.8.9"  # not a pool pod: a sidecar must never dial it


@dataclass
class PDStack:
    gw: GatewayHandle
    sidecars: list[SidecarHandle]
    prefill: list[tuple[str, int]]
    decode: list[tuple[str, int]]
    workdir: Path
    prefill_proc: subprocess.Popen[bytes] | None = None
    decode_proc: subprocess.Popen[bytes] | None = None

    def spawn_prefill(self) -> None:
        self.prefill_proc = _spawn_sims(self.workdir, "prefill", self.prefill, time_scale=1.0)

    async def states(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            for host, port in [*self.prefill, *self.decode]:
                try:
                    async with s.get(f"http://{host}:{port}/sim/state") as r:
                        out[f"{host}:{port}"] = await r.json()
                except aiohttp.ClientError:
                    out[f"{host}:{port}"] = {"alive": False}
        return out

    async def sidecar_metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        total = 0.0
        async with aiohttp.ClientSession() as s:
            for sc in self.sidecars:
                async with s.get(sc.metrics_url) as r:
                    text = await r.text()
                for lab, v in metric_samples(text, name):
                    if labels is None or all(lab.get(k) == x for k, x in labels.items()):
                        total += v
        return total

    async def epp_metric(self, name: str, labels: dict[str, str]) -> float:
        text = await self.gw.metrics_text()
        return sum(v for lab, v in metric_samples(text, name)
                   if all(lab.get(k) == x for k, x in labels.items()))


def _spawn_sims(
    workdir: Path, role: str, servers: list[tuple[str, int]], time_scale: float
) -> subprocess.Popen[bytes]:
    cfg = workdir / f"{role}.yaml"
    cfg.write_text(yaml.safe_dump({
        "defaults": {"model": MODEL, "time_scale": time_scale},
        "servers": [{"host": h, "port": p, "role": role} for h, p in servers],
    }))  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "epp.sim", "--config", str(cfg)], cwd=ROOT,
        stdout=(workdir / f"{role}.log").open("ab"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


async def _wait_sims(servers: list[tuple[str, int]], proc: subprocess.Popen[bytes]) -> None:
    for h, p in servers:
        await wait_http(f"http://{h}:{p}/health", proc=proc)


@pytest.fixture(scope="module")
def pd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PDStack]:
    workdir = tmp_path_factory.mktemp("pd")
    port = free_port(PREFILL_IPS[0])
    prefill = [(ip, port) for ip in PREFILL_IPS]
    decode = [(ip, port) for ip in DECODE_IPS]
    # Prefill pods at full model speed, so a long prefill lasts long enough to be cancelled.
    # Same speed as the prefill pods: with faster decode pods, prefilling locally would
    # really be faster and the EPP would (rightly) keep long prompts local.
    decode_proc = _spawn_sims(workdir, "decode", decode, time_scale=1.0)
    stack = PDStack(None, [], prefill, decode, workdir, None, decode_proc)  # type: ignore[arg-type]
    stack.spawn_prefill()
    try:
        assert stack.prefill_proc is not None
        asyncio.run(_wait_sims(prefill, stack.prefill_proc))
        asyncio.run(_wait_sims(decode, decode_proc))
        stack.sidecars = asyncio.run(start_sidecars(decode, prefill, workdir / "sidecars"))
        endpoints = pd_endpoints(prefill, stack.sidecars, {"model": MODEL})
        stack.gw = asyncio.run(start_gateway(
            endpoints, workdir=str(workdir / "gw"), epp_args=["--debug-decisions"]))
        yield stack
    finally:
        if stack.gw is not None:
            stack.gw.close()
        stop_sidecars(stack.sidecars)
        stop_process(stack.prefill_proc)
        stop_process(decode_proc)


def _words(tag: str, n: int) -> str:
    """`n` simulator tokens of pseudo-words, different for every tag."""
    return text_of(random.Random(tag), n)


def _chat(content: str | list[dict[str, str]], max_tokens: int = 8) -> dict[str, Any]:
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str
    usage: dict[str, Any]
    raw: bytes


async def _send(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Reply:
    async with aiohttp.ClientSession() as s, s.post(
        url + "/v1/chat/completions", data=orjson.dumps(body),
        headers={"content-type": "application/json", **(headers or {})},
    ) as r:
        raw = await r.read()
        hdrs = {k.lower(): v for k, v in r.headers.items()}
    text: list[str] = []
    usage: dict[str, Any] = {}
    if hdrs.get("content-type", "").startswith("text/event-stream"):
        for line in raw.split(b"\n\n"):
            if line.startswith(b"data: {"):
                data = orjson.loads(line[6:])
                usage = data.get("usage") or usage
                for ch in data.get("choices") or ():
                    text.append((ch.get("delta") or {}).get("content") or "")
    return Reply(r.status, hdrs, "".join(text), usage, raw)


def _log_lines(path: Path, request_id: str) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if request_id in line and line.startswith("{"):
            out.append(orjson.loads(line))
    return out


def _delta(after: dict[str, dict[str, Any]], before: dict[str, dict[str, Any]],
           key: str) -> dict[str, int]:
    return {a: after[a].get(key, 0) - before[a].get(key, 0) for a in after
            if after[a].get(key, 0) != before[a].get(key, 0)}


async def test_long_fresh_prompt_prefilled_remotely_decoded_on_decode_pod(pd: PDStack) -> None:
    before = await pd.states()
    reply = await _send(pd.gw.url, _chat(_words("fresh", 3000)))
    after = await pd.states()

    assert reply.status == 200, reply.raw[:300]
    assert reply.headers["x-epp-pd"] == "disaggregated"
    assert reply.raw.endswith(b"data: [DONE]\n\n")
    assert reply.usage["completion_tokens"] == 8
    # Started at decode from the transferred KV: all but the last prompt token were cached.
    assert reply.usage["prompt_tokens_details"]["cached_tokens"] == reply.usage[
        "prompt_tokens"] - 1
    # The engines' own counters: one prefill pod ran the prefill, the decode pod that
    # answered started from remote KV; nothing else happened anywhere.
    prefilled = _delta(after, before, "prefill_only_total")
    remote = _delta(after, before, "remote_prefilled_total")
    served = reply.headers["x-sim-server"]
    assert list(prefilled.values()) == [1] and next(iter(prefilled)) in {
        f"{h}:{p}" for h, p in pd.prefill}
    assert remote == {served: 1} and served in {f"{h}:{p}" for h, p in pd.decode}
    assert sum(_delta(after, before, "requests_total").values()) == 2

    # Same request id in the EPP's decision log and the sidecar's log line.
    rid = reply.headers["x-request-id"]
    decision = [r for r in _log_lines(pd.gw.workdir / "epp-0.log", rid) if r["msg"] == "decision"]
    assert decision and decision[0]["pd"]["decision"] == "disaggregated"
    assert decision[0]["pd"]["reason"] == "remote-faster"
    assert decision[0]["prefill"] == next(iter(prefilled))
    sidecar_lines = [r for sc in pd.sidecars for r in _log_lines(sc.log, rid)]
    assert [r["msg"] for r in sidecar_lines] == ["prefilled remotely"]
    assert sidecar_lines[0]["prefiller"] == decision[0]["prefill"]
    assert await pd.epp_metric("epp_pd_decisions_total",
                               {"decision": "disaggregated", "reason": "remote-faster"}) >= 1
    # The EPP also reads what the sidecar did (x-epp-pd on the response headers).
    assert await pd.epp_metric("epp_pd_outcomes_total", {"outcome": "disaggregated"}) >= 1
    assert await wait_inflight_zero(pd.gw) == 0


async def test_decode_pod_without_sidecar_is_reported_not_silent(pd: PDStack) -> None:
    """The failure the other routers' users complain about: a decode pod with no sidecar
    prefills locally whatever the EPP decided. Here it cannot go unnoticed."""
    endpoints = [
        {"address": h, "port": p, "name": f"prefill-{i}", "labels": {"model": MODEL,
                                                                     "role": "prefill"}}
        for i, (h, p) in enumerate(pd.prefill)
    ] + [
        {"address": h, "port": p, "name": f"bare-decode-{i}", "labels": {"model": MODEL,
                                                                         "role": "decode"}}
        for i, (h, p) in enumerate(pd.decode)
    ]  # fmt: skip
    gw = await start_gateway(endpoints, workdir=str(pd.workdir / "gw-bare"))
    try:
        reply = await _send(gw.url, _chat(_words("bare", 3000)))
        assert reply.status == 200 and "x-epp-pd" not in reply.headers
        text = await gw.metrics_text()
        outcomes = {lab["outcome"]: v for lab, v in metric_samples(text, "epp_pd_outcomes_total")}
        assert outcomes == {"no-sidecar": 1.0}
        log = (gw.workdir / "epp-0.log").read_text()
        assert "answered without the P/D sidecar" in log
    finally:
        gw.close()


async def test_cached_multi_turn_request_stays_local(pd: PDStack) -> None:
    history: list[dict[str, str]] = [
        {"role": "system", "content": _words("sys", 2500)},
        {"role": "user", "content": "first question"},
    ]
    first = await _send(pd.gw.url, _chat(history, max_tokens=16))
    assert first.status == 200 and first.headers["x-epp-pd"] == "disaggregated"
    history += [{"role": "assistant", "content": first.text},
                {"role": "user", "content": "and a short follow-up question"}]
    before = await pd.states()
    second = await _send(pd.gw.url, _chat(history))
    after = await pd.states()

    assert second.status == 200, second.raw[:300]
    assert second.headers["x-epp-pd"] == "local"
    assert second.headers["x-sim-server"] == first.headers["x-sim-server"]  # where it's cached
    assert not _delta(after, before, "prefill_only_total")  # no prefill pod was asked
    assert _delta(after, before, "requests_total") == {second.headers["x-sim-server"]: 1}
    cached = second.usage["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 2500, second.usage
    rid = second.headers["x-request-id"]
    decision = [r for r in _log_lines(pd.gw.workdir / "epp-0.log", rid) if r["msg"] == "decision"]
    # A short uncached tail: the hop (KV transfer of the whole history) costs more than
    # the stall a local prefill puts on the decode pod.
    assert decision[0]["pd"] == {**decision[0]["pd"], "decision": "local",
                                 "reason": "local-faster"}
    assert decision[0]["pd"]["remote_ms"] > decision[0]["pd"]["local_ms"]


async def test_non_pool_prefill_target_is_refused_and_never_dialled(pd: PDStack) -> None:
    dialled: list[str] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dialled.append("connection")
        writer.close()

    outsider = await asyncio.start_server(on_connect, OUTSIDER_IP, 0)
    target = f"{OUTSIDER_IP}:{outsider.sockets[0].getsockname()[1]}"
    try:
        rejected_before = await pd.sidecar_metric("epp_sidecar_rejected_targets_total")
        # Straight at a sidecar, as anything inside the cluster could: refused, 400.
        for header, reason in ((target, "not_allowed"),
                               (f"localhost:{pd.prefill[0][1]}", "not_an_ip")):
            reply = await _send(pd.sidecars[0].url, _chat(_words("ssrf", 400)),
                                {"x-prefiller-host-port": header})
            assert reply.status == 400, reply.raw[:300]
            err = orjson.loads(reply.raw)["error"]
            assert err["code"] == "prefill_target_refused"
            assert await pd.sidecar_metric("epp_sidecar_rejected_targets_total",
                                           {"reason": reason}) >= 1
        assert await pd.sidecar_metric(
            "epp_sidecar_rejected_targets_total") == rejected_before + 2
        # Through the gateway the client's header never survives the EPP.
        reply = await _send(pd.gw.url, _chat("short question"),
                            {"x-prefiller-host-port": target})
        assert reply.status == 200 and reply.headers["x-epp-pd"] == "local"
        # A client's own kv_transfer_params cannot steer the engine's KV pull either.
        body = _chat("another short one")
        body["kv_transfer_params"] = {"do_remote_prefill": True, "remote_host": OUTSIDER_IP}
        before = await pd.states()
        reply = await _send(pd.gw.url, body)
        after = await pd.states()
        assert reply.status == 200
        assert not _delta(after, before, "remote_prefilled_total")
        await asyncio.sleep(0.2)
        assert dialled == []
    finally:
        outsider.close()
        await outsider.wait_closed()


async def _until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, f"{cond.__name__}: not reached in {timeout}s"
        await asyncio.sleep(0.05)


async def test_cancelled_stream_cancels_prefill_and_decode(pd: PDStack) -> None:
    # 1. The client goes away while the prefill pod is prefilling: the prefill is aborted
    #    and the decode pod never hears of the request.
    before = await pd.states()
    cancelled_before = await pd.sidecar_metric("epp_sidecar_cancelled_total")
    session = aiohttp.ClientSession()
    task = asyncio.create_task(session.post(
        pd.gw.url + "/v1/chat/completions", data=orjson.dumps(_chat(_words("cancel", 8000))),
        headers={"content-type": "application/json"}))

    async def prefilling() -> bool:
        now = await pd.states()
        return bool(_delta(now, before, "prefill_only_total")) and any(
            now[f"{h}:{p}"]["running"] for h, p in pd.prefill)

    await _until(prefilling)
    task.cancel()
    await session.close()

    async def prefill_aborted() -> bool:
        now = await pd.states()
        return bool(_delta(now, before, "aborted_total")) and all(
            now[f"{h}:{p}"]["running"] == 0 for h, p in pd.prefill)

    await _until(prefill_aborted)
    after = await pd.states()
    assert set(_delta(after, before, "aborted_total")) <= {f"{h}:{p}" for h, p in pd.prefill}
    assert not _delta(after, before, "remote_prefilled_total")
    assert await pd.sidecar_metric("epp_sidecar_cancelled_total",
                                   {"phase": "prefill"}) >= 1

    # 2. The client goes away mid-decode: the decode engine aborts the request.
    before = await pd.states()
    async with aiohttp.ClientSession() as s:
        r = await s.post(pd.gw.url + "/v1/chat/completions",
                         data=orjson.dumps(_chat(_words("long", 3000), max_tokens=4000)),
                         headers={"content-type": "application/json"})
        assert r.status == 200 and r.headers["x-epp-pd"] == "disaggregated"
        await r.content.readany()  # the first tokens are streaming
        served = r.headers["x-sim-server"]
        r.close()

    async def decode_aborted() -> bool:
        now = await pd.states()
        return _delta(now, before, "aborted_total") == {served: 1} and now[served][
            "running"] == 0

    await _until(decode_aborted)
    assert await pd.sidecar_metric("epp_sidecar_cancelled_total") >= cancelled_before + 2
    assert await wait_inflight_zero(pd.gw) == 0


async def test_dead_prefill_pods_fall_back_to_local_decode_and_say_so(pd: PDStack) -> None:
    stop_process(pd.prefill_proc)  # both prefill pods die; the EPP may still name one
    try:
        fallbacks = await pd.sidecar_metric("epp_sidecar_fallbacks_total")
        reply = await _send(pd.gw.url, _chat(_words("orphan", 3000)))
        assert reply.status == 200, reply.raw[:300]
        assert reply.headers["x-epp-pd"] == "local-fallback"
        assert reply.raw.endswith(b"data: [DONE]\n\n")
        assert reply.headers["x-sim-server"] in {f"{h}:{p}" for h, p in pd.decode}
        assert await pd.sidecar_metric("epp_sidecar_fallbacks_total",
                                       {"reason": "connect"}) >= 1
        assert await pd.sidecar_metric("epp_sidecar_fallbacks_total") == fallbacks + 1
        assert await pd.epp_metric("epp_pd_outcomes_total", {"outcome": "local-fallback"}) >= 1
        rid = reply.headers["x-request-id"]
        lines = [r for sc in pd.sidecars for r in _log_lines(sc.log, rid)]
        assert [(r["level"], r["reason"]) for r in lines] == [("warning", "connect")]
        assert await wait_inflight_zero(pd.gw) == 0
    finally:
        pd.spawn_prefill()
        assert pd.prefill_proc is not None
        await _wait_sims(pd.prefill, pd.prefill_proc)

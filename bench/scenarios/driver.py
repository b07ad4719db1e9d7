"""Open-loop load driver: sends a seeded schedule through a router and records, per request,
TTFT, inter-token gaps, E2E, token counts, cached tokens, status and which pod served it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from bench.scenarios.workload import RequestSpec


@dataclass(slots=True)
class Result:
    ok: bool
    status: int
    start: float  # wall seconds after phase start
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    server: str = ""
    pd_mode: str = ""  # x-epp-pd from a P/D sidecar: local | disaggregated | local-fallback
    error: str = ""
    group: str = ""
    tenant: str = ""

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


async def _one(
    http: aiohttp.ClientSession, url: str, model: str, spec: RequestSpec,
    messages: list[dict[str, str]], t0: float, timeout_s: float,
) -> tuple[Result, str]:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": spec.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.monotonic()
    res = Result(ok=False, status=0, start=start - t0, group=spec.group, tenant=spec.tenant)
    reply: list[str] = []
    try:
        async with http.post(
            url + "/v1/chat/completions", data=orjson.dumps(body),
            headers={"content-type": "application/json", **spec.headers},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as r:
            res.status = r.status
            res.server = r.headers.get("x-sim-server", "")
            res.pd_mode = r.headers.get("x-epp-pd", "")
            if r.status != 200:
                res.error = (await r.text())[:200]
                res.e2e = time.monotonic() - start
                return res, ""
            last = 0.0
            buf = b""
            async for chunk in r.content.iter_any():
                now = time.monotonic()
                buf += chunk
                *lines, buf = buf.split(b"\n\n")
                for line in lines:
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    data = orjson.loads(line[6:])
                    if "error" in data:
                        res.error = str(data["error"])[:200]
                        continue
                    for ch in data.get("choices") or ():
                        piece = (ch.get("delta") or {}).get("content")
                        if piece:
                            reply.append(piece)
                            if last == 0.0:
                                res.ttft = now - start
                            else:
                                res.itls.append(now - last)
                            last = now
                    usage = data.get("usage")
                    if usage:
                        res.prompt_tokens = int(usage.get("prompt_tokens", 0))
                        res.output_tokens = int(usage.get("completion_tokens", 0))
                        details = usage.get("prompt_tokens_details") or {}
                        res.cached_tokens = int(details.get("cached_tokens") or 0)
            res.e2e = time.monotonic() - start
            res.ok = bool(reply) and not res.error
            if not res.output_tokens:
                res.output_tokens = len(reply)
    except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
        res.e2e = time.monotonic() - start
    return res, "".join(reply)


async def drive(
    url: str, model: str, schedule: Sequence[RequestSpec], *, time_scale: float,
    max_wall_s: float, request_timeout_s: float = 120.0,
) -> tuple[list[Result], float]:
    """Send `schedule` open-loop (arrival times scaled to wall time); multi-turn sessions
    chain their turns. Returns results and the wall duration of the phase. Requests not
    yet sent when `max_wall_s` is reached are skipped; in-flight ones get a grace period."""
    results: list[Result] = []
    histories: dict[str, list[dict[str, str]]] = {}
    session_locks: dict[str, asyncio.Lock] = {}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    t0 = time.monotonic()
    deadline = t0 + max_wall_s

    async def run(spec: RequestSpec) -> None:
        delay = t0 + spec.at * time_scale - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if spec.session:
            lock = session_locks.setdefault(spec.session, asyncio.Lock())
            async with lock:
                if time.monotonic() > deadline:
                    return
                history = histories.setdefault(spec.session, [])
                messages = [*history, *spec.messages]
                res, reply = await _one(http, url, model, spec, messages, t0, request_timeout_s)
                results.append(res)
                if res.ok:
                    history.extend([*spec.messages, {"role": "assistant", "content": reply}])
            return
        if time.monotonic() > deadline:
            return
        res, _ = await _one(http, url, model, spec, spec.messages, t0, request_timeout_s)
        results.append(res)

    async with aiohttp.ClientSession(connector=connector) as http:
        tasks = [asyncio.create_task(run(s)) for s in schedule]
        _done, pending = await asyncio.wait(tasks, timeout=max_wall_s + request_timeout_s)
        for p in pending:
            p.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return results, time.monotonic() - t0


async def sample_pods(
    urls: Sequence[str], stop: asyncio.Event, interval_s: float = 0.5
) -> list[dict[str, Any]]:
    """Poll every pod's /sim/state until `stop`; returns [{t, pod, running, waiting, kv}]."""
    out: list[dict[str, Any]] = []
    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while not stop.is_set():
            for u in urls:
                try:
                    async with http.get(u + "/sim/state") as r:
                        s = await r.json()
                    out.append({"t": time.monotonic() - t0, "pod": s["address"],
                                "running": s["running"], "waiting": s["waiting"],
                                "kv": s["kv_usage"]})
                except (TimeoutError, aiohttp.ClientError):
                    out.append({"t": time.monotonic() - t0, "pod": u.removeprefix("http://"),
                                "running": 0, "waiting": 0, "kv": 0.0, "down": True})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
    return out

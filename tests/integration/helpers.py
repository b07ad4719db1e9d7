"""Test helpers: HTTP calls through the gateway and reading the EPP's metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from epp.devstack.stack import GatewayHandle


async def post(
    gw: GatewayHandle,
    body: dict[str, Any] | bytes,
    *,
    path: str = "/v1/completions",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    hdrs = {"content-type": "application/json", **(headers or {})}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.url + path, data=data, headers=hdrs) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out.append((dict(s.labels), float(s.value)))
    return out


async def inflight_total(gw: GatewayHandle) -> float:
    text = await gw.metrics_text()
    return sum(v for _, v in metric_samples(text, "epp_inflight_requests"))


async def wait_inflight_zero(gw: GatewayHandle, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    total = await inflight_total(gw)
    while total != 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        total = await inflight_total(gw)
    return total

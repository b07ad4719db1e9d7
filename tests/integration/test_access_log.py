"""The response phase from Envoy's gRPC access log (`--response-from-access-log`), through a
real Envoy: no response-header messages, the charge held until the response really ends,
the entry matched to the decision, a client that goes away leaves nothing in flight."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson

from tests.integration.conftest import GatewayFactory, endpoint_dicts
from tests.integration.helpers import inflight_total, metric_samples, post, wait_inflight_zero


async def _access_log_counts(gw: object) -> dict[str, float]:
    text = await gw.metrics_text()  # type: ignore[attr-defined]
    return {
        labels["outcome"]: v for labels, v in metric_samples(text, "epp_access_log_responses_total")
    }


async def test_charge_held_until_the_streamed_response_ends(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    gw = await gateway(endpoint_dicts(echo_pool), access_log=True)
    body = {"model": "m", "prompt": "a streamed answer " * 20, "stream": True,
            "n_chunks": 15, "chunk_ms": 100}  # fmt: skip
    task = asyncio.create_task(post(gw, body))
    # The ext_proc stream closed right after the routing answer (nothing else is sent to
    # the EPP), yet the request still runs upstream: it stays charged.
    await asyncio.sleep(0.8)
    assert not task.done()
    assert await inflight_total(gw) == 1
    status, _, raw = await task
    t_end = time.monotonic()
    assert status == 200, raw
    # Released by its access-log entry, within the flush interval, not by the fallback
    # timer (the predicted end plus seconds of grace).
    assert await wait_inflight_zero(gw, timeout=1.0) == 0
    assert time.monotonic() - t_end < 1.0
    counts = await _access_log_counts(gw)
    assert counts.get("matched") == 1, counts
    assert not counts.get("missing"), counts


async def test_every_request_matched_and_released(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    gw = await gateway(endpoint_dicts(echo_pool), access_log=True)
    results = await asyncio.gather(
        *(post(gw, {"model": "m", "prompt": f"prompt {i} " * 40, "max_tokens": 4})
          for i in range(40))
    )  # fmt: skip
    assert [s for s, _, _ in results] == [200] * 40
    assert await wait_inflight_zero(gw, timeout=2.0) == 0
    counts = await _access_log_counts(gw)
    assert counts.get("matched") == 40, counts
    # Durations and first-byte times come from the entries (one each per request).
    text = await gw.metrics_text()
    for name in (
        "inference_objective_request_duration_seconds_count",
        "inference_objective_time_to_first_byte_seconds_count",
    ):
        assert sum(v for _, v in metric_samples(text, name)) == 40, name
    served = {orjson.loads(raw)["served_by"] for _, _, raw in results}
    assert len(served) > 1


async def test_client_gone_mid_stream_leaves_nothing_in_flight(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory
) -> None:
    gw = await gateway(endpoint_dicts(echo_pool), access_log=True)
    body = orjson.dumps({"model": "m", "prompt": "long " * 20, "stream": True,
                         "n_chunks": 100, "chunk_ms": 100})  # fmt: skip
    async with aiohttp.ClientSession() as s:
        r = await s.post(gw.url + "/v1/completions", data=body,
                         headers={"content-type": "application/json"})  # fmt: skip
        await r.content.readany()
        assert await inflight_total(gw) == 1
        r.close()  # the client goes away 10 s before the answer would end
    assert await wait_inflight_zero(gw, timeout=3.0) == 0
    counts = await _access_log_counts(gw)
    assert counts.get("matched") == 1, counts

"""bench.extproc_cpu drives the real servicer with Envoy's messages: every request must be
routed (three answers: the held headers with the destination, the echoed body, the response
headers' answer), not answered with an error (one answer)."""

from __future__ import annotations

from bench.extproc_cpu import measure


async def test_every_request_is_routed() -> None:
    out = await measure(requests=60, concurrency=4, profile=False, rounds=2)
    assert out["answers_per_request"] == 3.0
    assert out["rounds"] == 2
    assert 0.0 < out["us_per_request_min"] <= out["us_per_request_median"]
    assert out["machine_loop_ms"] > 0.0

"""A pod SIGKILLed under 20 req/s, through real Envoy + the EPP + simulator processes.

Requests that had not received a response byte when the pod died are retried on the EPP's
fallbacks (zero failures); streams already under way are cut, never replayed; the EPP stops
picking the dead pod at once and picks it again once it is back. bench/faults.py is the
scenario (`python -m bench.faults` for the figures in bench/RESULTS.md).
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from bench.faults import run_kill
from epp.devstack.procs import free_port
from tests.integration.conftest import GatewayFactory, endpoint_dicts
from tests.integration.helpers import metric_samples, post

pytestmark = pytest.mark.integration


async def test_sigkilled_pod_loses_only_started_streams(tmp_path: Path) -> None:
    rep = await run_kill(
        rate=20, duration=10.0, kill_at=3.5, restart_at=6.5, workdir=tmp_path, seed=7
    )
    assert rep.requests >= 190
    assert rep.failed_without_byte == 0, rep.failures
    # Every retry Envoy made shows in an answered request's attempt count: none happened
    # after response bytes went out (those would have been spliced or hidden).
    assert rep.hidden_retries == 0, rep
    # Something was actually in flight on the victim and had to be retried or cut.
    assert rep.retried + rep.cut_mid_response > 0, rep
    assert rep.ok == rep.requests - rep.cut_mid_response
    # The EPP learned of it within a scrape interval (50 ms; the bounds leave room for a
    # busy machine and the metrics polling) and stopped picking it ...
    assert rep.marked_down_after_kill_s is not None and rep.marked_down_after_kill_s < 1.0, rep
    assert rep.last_pick_after_kill_s is None or rep.last_pick_after_kill_s < 1.0, rep
    # ... and took it back once it was healthy again (scrape backoff is at most 2 s).
    assert rep.back_after_restart_s is not None and rep.back_after_restart_s < 5.0, rep
    assert rep.inflight_after == 0 and rep.open_requests_after == 0, rep


@pytest.mark.parametrize("mode", ["FULL_DUPLEX_STREAMED", "BUFFERED"])
async def test_gateway_retries_teach_the_epp_without_the_scraper(
    echo_pool: list[tuple[str, int]], gateway: GatewayFactory, mode: str
) -> None:
    """A listed endpoint nothing listens on: requests routed to it first are retried on a
    fallback, and the failure-learning hook (the scraper is off here) takes it out."""
    dead_ip = "127.0.0.6"
    dead = {"address": dead_ip, "port": free_port(dead_ip), "name": "dead"}
    gw = await gateway([*endpoint_dicts(echo_pool[:2]), dead], scrape_interval=0, body_mode=mode)
    attempts = []
    for i in range(30):
        body = {"model": "m", "prompt": f"request {i} " + "words " * 2000}  # retried bodies
        status, headers, raw = await post(gw, body)
        assert status == 200, raw
        assert orjson.loads(raw)["body_len"] == len(orjson.dumps(body))  # arrived whole
        attempts.append(int(headers.get("x-envoy-attempt-count", "1")))
    key = f"{dead['address']}:{dead['port']}"
    down = metric_samples(await gw.metrics_text(), "epp_endpoint_down")
    assert ({"endpoint": key, "reason": "unreachable"}, 1.0) in down
    # Learned on the first retry: at most a couple of requests had to go around it.
    assert 1 <= sum(a > 1 for a in attempts) <= 2, attempts

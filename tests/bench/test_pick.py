"""bench.pick's precise case times what `epp serve` does: one pick that tokenizes the request
itself, with the tokenizer's share reported apart (not a second, cached tokenization)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from bench.pick import run_precise_case
from epp.sim.tokenizer import DATA_DIR
from epp.tokenization.tokenizer import ModelTokenizer


def test_precise_case_counts_one_tokenization_inside_the_pick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    real_ids, real_partial = ModelTokenizer.request_ids, ModelTokenizer.request_partial

    def counting_ids(
        self: ModelTokenizer,
        api: str,
        body: Mapping[str, Any],
        marks: list[tuple[int, int]] | None = None,
    ) -> list[int] | None:
        calls.append("engine")
        return real_ids(self, api, body, marks)

    def counting_partial(self: ModelTokenizer, api: str, body: Mapping[str, Any]) -> Any:
        calls.append("pick")
        return real_partial(self, api, body)

    monkeypatch.setattr(ModelTokenizer, "request_ids", counting_ids)
    monkeypatch.setattr(ModelTokenizer, "request_partial", counting_partial)
    res = run_precise_case(10, 400, 20, str(DATA_DIR))
    assert res["iterations"] == 20
    assert res["tokenize_p50_us"] > 0 and res["p50_us"] > 0
    assert res["total_p50_us"] >= res["tokenize_p50_us"]
    # Warm-up (64) and every timed pick tokenize once in the pick and once for the emulated
    # engine's KV events: nothing else may tokenize on the way.
    assert calls.count("pick") == calls.count("engine") == 64 + 20

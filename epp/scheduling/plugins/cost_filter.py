"""Cost-aware placement for mixed hardware: the cheapest pods predicted to meet the SLO.

Pods carry a relative cost in a label (`costLabel`, default `cost`: e.g. 1 for an H100,
0.4 for an L4; from the standalone endpoints file's labels or the pod's labels; a missing
or unreadable label counts as `defaultCost`). For a request with SLO headers
(`x-slo-ttft-ms`, `x-slo-tpot-ms`) the filter keeps the endpoints predicted by the latency
model to meet them (TTFT from the prefill queued there plus this request's uncached tokens,
TPOT from the decode batch; a pod with no learned prefill rate whose engine reports a
slower decode than the fastest is assumed to prefill slower in proportion; predictions are
scaled by `safetyFactor`, default 1.0) and, of those, the
cheapest (cost within `tolerance` of the cheapest, default 0) — the profile's scorers then
choose among them. Requests without SLO headers, and requests no endpoint is predicted to
serve in time, pass unchanged: they are placed as without this plugin.
"""

from __future__ import annotations

import math

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.framework import Filter
from epp.scheduling.plugins.common import prefix_match
from epp.scheduling.request import CycleState, InferenceRequest


class CostAwareFilter(Filter):
    type_name = "cost-aware-filter"

    def configure(self) -> None:
        p = self.params
        unknown = set(p) - {"costLabel", "defaultCost", "tolerance", "safetyFactor"}
        if unknown:
            raise ValueError(f"cost-aware-filter: unknown parameter(s) {sorted(unknown)}")
        self.label = str(p.get("costLabel", "cost"))
        self.default_cost = float(p.get("defaultCost", 1.0))
        self.tolerance = float(p.get("tolerance", 0.0))
        self.safety = float(p.get("safetyFactor", 1.0))
        if self.default_cost < 0 or self.tolerance < 0 or self.safety <= 0:
            raise ValueError(
                "cost-aware-filter: defaultCost and tolerance must be >= 0, safetyFactor > 0"
            )
        self._parsed: dict[str, tuple[str | None, float]] = {}  # endpoint key -> (raw, cost)

    def cost(self, ep: Endpoint) -> float:
        raw = ep.labels.get(self.label)
        cached = self._parsed.get(ep.key)
        if cached is not None and cached[0] == raw:
            return cached[1]
        try:
            value = float(raw) if raw is not None else self.default_cost
        except ValueError:
            value = self.default_cost
        if not math.isfinite(value) or value < 0:
            value = self.default_cost
        if len(self._parsed) > 4096:  # endpoints come and go: never grow without bound
            self._parsed.clear()
        self._parsed[ep.key] = (raw, value)
        return value

    def filter(
        self, cycle: CycleState, request: InferenceRequest, endpoints: list[Endpoint]
    ) -> list[Endpoint]:
        slo_ttft, slo_tpot = request.slo_ttft_ms, request.slo_tpot_ms
        if (slo_ttft is None and slo_tpot is None) or len(endpoints) < 2:
            return endpoints
        model = self.services.latency
        safety = self.safety
        meeting: list[Endpoint] = []
        if slo_ttft is not None:
            match = prefix_match(cycle, self.services, request)
            blocks = match.matched_blocks
            block_tokens = self.services.prefix_index.block_tokens
        for ep in endpoints:
            if slo_ttft is not None:
                cached = blocks.get(ep.key, 0) * block_tokens if blocks else 0
                uncached = max(0, request.prompt_tokens - cached)
                # The model's speeds already say how much slower a pod runs (its decode
                # speed over quiet windows: hardware, not load, sets both).
                ttft = model.predict_ttft_ms(ep, uncached)
                if ttft * safety > slo_ttft:
                    continue
            if slo_tpot is not None and model.predict_tpot_ms(ep) * safety > slo_tpot:
                continue
            meeting.append(ep)
        if not meeting:
            return endpoints
        costs = [self.cost(ep) for ep in meeting]
        limit = min(costs) * (1.0 + self.tolerance)
        return [ep for ep, c in zip(meeting, costs, strict=True) if c <= limit]

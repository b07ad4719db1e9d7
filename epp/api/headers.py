"""HTTP header names of the gateway protocol, shared by extproc, requestcontrol, the dev
stack and the P/D sidecar. One place, so a rename cannot leave a stale copy behind."""

from __future__ import annotations

from dataclasses import dataclass

DESTINATION = "x-gateway-destination-endpoint"
DESTINATION_SERVED = "x-gateway-destination-endpoint-served"
SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_HINT_KEY = "x-gateway-destination-endpoint-subset"
LB_METADATA_NAMESPACE = "envoy.lb"
PREFILLER = "x-prefiller-host-port"
BUSINESS = "x-business"
OBJECTIVE = "x-gateway-inference-objective"
FAIRNESS = "x-gateway-inference-fairness-id"
MODEL_REWRITE = "x-gateway-model-name-rewrite"
SLO_TTFT = "x-slo-ttft-ms"
SLO_TPOT = "x-slo-tpot-ms"
SESSION = "x-session-id"
REQUEST_ID = "x-request-id"
# Set by the P/D sidecar on its answer: how the request was served (see epp/sidecar).
PD_MODE = "x-epp-pd"


@dataclass(slots=True)
class HeaderNames:
    """The request headers the EPP reads; `business` is configurable (--business-header)."""

    business: str = BUSINESS
    objective: str = OBJECTIVE
    fairness: str = FAIRNESS
    model_rewrite: str = MODEL_REWRITE
    slo_ttft: str = SLO_TTFT
    slo_tpot: str = SLO_TPOT
    session: str = SESSION
    destination: str = DESTINATION
    prefiller: str = PREFILLER

    def control_headers(self) -> tuple[str, ...]:
        """Headers meant for the EPP only; never forwarded to a model server."""
        return (
            self.business,
            self.objective,
            self.fairness,
            self.model_rewrite,
            self.slo_ttft,
            self.slo_tpot,
            self.session,
        )

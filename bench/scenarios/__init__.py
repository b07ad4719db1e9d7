"""Benchmark scenarios: a simulated pool, a workload, a load sweep and SLOs.

Rates and latencies are in model time (what the modelled GPUs would see); the runner
divides wall-clock measurements by the pool's `time_scale`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bench.scenarios.workload import WorkloadSpec
from epp.sim.config import SimConfig, make_config

# Loopback range reserved for benchmark pools (tests use other ports/addresses).
BENCH_BASE_IP = "127.0.3."
BENCH_PORT = 8100


@dataclass(slots=True)
class Scenario:
    name: str
    description: str
    pool: list[SimConfig]
    workload: WorkloadSpec
    rates: list[float]  # requests per model second
    requests_per_rate: int = 200
    # Wall-clock bound per (router, rate) phase; 0 = the schedule's length plus 60 s.
    max_phase_s: float = 0.0
    slo_ttft_s: float = 1.0
    slo_tpot_s: float = 0.05
    seed: int = 1
    default_routers: list[str] = field(default_factory=lambda: ["round_robin", "epp"])

    @property
    def time_scale(self) -> float:
        return self.pool[0].time_scale if self.pool else 1.0

    def quick(self) -> Scenario:
        """A small version: two rates, fewer requests, short phases."""
        rates = [self.rates[0], self.rates[-1]] if len(self.rates) > 1 else list(self.rates)
        return dataclasses.replace(
            self,
            rates=rates,
            requests_per_rate=max(20, self.requests_per_rate // 4),
            max_phase_s=min(self.max_phase_s, 45.0) if self.max_phase_s else 45.0,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "pool": [c.to_dict() for c in self.pool],
            "workload": dataclasses.asdict(self.workload),
            "rates": self.rates,
            "requests_per_rate": self.requests_per_rate,
            "max_phase_s": self.max_phase_s,
            "slo_ttft_s": self.slo_ttft_s,
            "slo_tpot_s": self.slo_tpot_s,
            "seed": self.seed,
            "time_scale": self.time_scale,
        }


def pool_of(
    n: int, preset: str = "h100-8b", roles: list[str] | None = None, first: int = 2,
    per_server: list[dict[str, Any]] | None = None, **common: Any,
) -> list[SimConfig]:
    out = []
    for i in range(n):
        extra = dict(per_server[i]) if per_server and i < len(per_server) else {}
        role = roles[i] if roles else "both"
        out.append(
            make_config(
                preset, host=f"{BENCH_BASE_IP}{first + i}", port=BENCH_PORT, role=role,
                **{**common, **extra},
            )
        )
    return out


PEERS_AND_EPP = ["round_robin", "vllm-router:cache_aware", "sglang-router:cache_aware", "epp"]

# Shape shared by most scenarios: a small H100-like engine (batch 32, KV for ~3 system
# prompts) so cache-blind routing thrashes at rates a 2-core machine can simulate.
_ENGINE: dict[str, Any] = {
    "max_num_seqs": 32,
    "num_gpu_blocks": 700,
    "time_scale": 2.0,
}


def _registry() -> dict[str, Scenario]:
    s: dict[str, Scenario] = {}
    s["shared_prefix"] = Scenario(
        name="shared_prefix",
        description="8 groups x 4 users; 2000-token system prompt per group, 60-token "
        "question, 32 output tokens; 4 pods each caching ~3 system prompts",
        pool=pool_of(4, **_ENGINE),
        workload=WorkloadSpec(kind="shared_prefix", groups=8, users_per_group=4,
                              system_tokens=2000, question_tokens=60, output_tokens=32),
        rates=[4.0, 8.0, 12.0],
        requests_per_rate=400,
        slo_ttft_s=1.0,
        slo_tpot_s=0.05,
        default_routers=PEERS_AND_EPP,
    )
    s["multi_turn"] = Scenario(
        name="multi_turn",
        description="conversations of 4 turns over 6 system prompts; each turn resends the "
        "history (previous replies included)",
        pool=pool_of(4, **_ENGINE),
        workload=WorkloadSpec(kind="multi_turn", groups=6, system_tokens=1000,
                              question_tokens=80, output_tokens=48, turns=4),
        rates=[2.0, 4.0],
        requests_per_rate=400,
    )
    s["mixed"] = Scenario(
        name="mixed",
        description="half long-prefill/short-decode (3000 in, 8 out), half short/long "
        "(100 in, 128 out): prefill interference with decodes",
        pool=pool_of(4, **_ENGINE),
        workload=WorkloadSpec(kind="mixed", long_fraction=0.5),
        rates=[2.0, 3.0],
        requests_per_rate=400,
        slo_ttft_s=2.0,
        default_routers=PEERS_AND_EPP,
    )
    s["bursts"] = Scenario(
        name="bursts",
        description="shared-prefix traffic arriving in bursts at 3x the mean rate",
        pool=pool_of(4, **_ENGINE),
        workload=WorkloadSpec(kind="shared_prefix", groups=8, system_tokens=2000,
                              output_tokens=32, burst_factor=3.0, burst_period_s=6.0),
        rates=[3.0, 6.0],
        requests_per_rate=400,
        default_routers=PEERS_AND_EPP,
    )
    s["kv_pressure"] = Scenario(
        name="kv_pressure",
        description="28 groups x 4 users, 2000-token system prompts: more prefixes than the "
        "pool's KV holds at once (each pod caches ~5 of them)",
        pool=pool_of(4, **_ENGINE),
        workload=WorkloadSpec(kind="shared_prefix", groups=28, users_per_group=4,
                              system_tokens=2000, question_tokens=60, output_tokens=32),
        rates=[4.0, 8.0],
        requests_per_rate=400,
        default_routers=PEERS_AND_EPP,
    )
    s["hot_prefix"] = Scenario(
        name="hot_prefix",
        description="8 groups on 6 pods, 2 of them carry 80% of the traffic; 128-token "
        "answers and 8 sequences per pod, so one pod cannot serve a hot group alone",
        pool=pool_of(6, **{**_ENGINE, "max_num_seqs": 8}),
        workload=WorkloadSpec(kind="shared_prefix", groups=8, users_per_group=4,
                              system_tokens=2000, question_tokens=100, output_tokens=128,
                              hot_groups=2, hot_fraction=0.8),
        rates=[6.0, 12.0],
        requests_per_rate=400,
        slo_tpot_s=0.1,
        default_routers=PEERS_AND_EPP,
    )
    s["hetero"] = Scenario(
        name="hetero",
        description="pods of different speeds (1x, 1x, 1.5x and 2x slower) and costs (label "
        "cost: 1, 1, 0.6, 0.4); requests carry TTFT/TPOT SLO headers",
        pool=pool_of(
            4,
            per_server=[
                {"labels": {"cost": "1.0"}},
                {"labels": {"cost": "1.0"}},
                {"slow_factor": 1.5, "labels": {"cost": "0.6"}},
                {"slow_factor": 2.0, "labels": {"cost": "0.4"}},
            ],
            **_ENGINE,
        ),
        workload=WorkloadSpec(kind="shared_prefix", groups=8, users_per_group=4,
                              system_tokens=2000, question_tokens=60, output_tokens=64,
                              headers={"x-slo-ttft-ms": "1000", "x-slo-tpot-ms": "50"}),
        rates=[4.0, 8.0],
        requests_per_rate=400,
        default_routers=PEERS_AND_EPP,
    )
    s["multi_tenant"] = Scenario(
        name="multi_tenant",
        description="two tenants on one pool (x-gateway-inference-fairness-id): tenant-a "
        "chats (shared prefixes) at 2 req/s; tenant-b sends 3000-token fresh prompts at its "
        "share (rate 4: 2 req/s) or floods at 3x its share (rate 8: 6 req/s)",
        pool=pool_of(4, **_ENGINE),
        workload=WorkloadSpec(kind="multi_tenant", groups=8, users_per_group=4,
                              system_tokens=2000, question_tokens=60, output_tokens=32,
                              steady_rate=2.0, long_prompt_tokens=3000, long_output_tokens=32),
        rates=[4.0, 8.0],
        requests_per_rate=800,
        default_routers=PEERS_AND_EPP,
    )
    s["pd"] = Scenario(
        name="pd",
        description="P/D pool: 2 prefill + 2 decode pods (vLLM kv_transfer_params), "
        "shared-prefix traffic",
        pool=pool_of(4, roles=["prefill", "prefill", "decode", "decode"], **_ENGINE),
        workload=WorkloadSpec(kind="shared_prefix", groups=8, system_tokens=2000,
                              output_tokens=64),
        rates=[2.0, 4.0],
        requests_per_rate=400,
        default_routers=["round_robin", "vllm-router:round_robin", "epp"],
    )
    s["pd_multi_turn"] = Scenario(
        name="pd_multi_turn",
        description="P/D pool (2 prefill + 2 decode), chat sessions of 6 turns over 4 shared "
        "2000-token system prompts; each turn resends the history, so after the first turn "
        "the decode pod holds most of the prompt and a local prefill is cheap",
        pool=pool_of(4, roles=["prefill", "prefill", "decode", "decode"],
                     **{**_ENGINE, "num_gpu_blocks": 1400}),
        workload=WorkloadSpec(kind="multi_turn", groups=4, system_tokens=2000,
                              question_tokens=100, output_tokens=64, turns=6),
        rates=[2.0, 4.0],
        requests_per_rate=432,  # 72 conversations of 6 turns
        default_routers=["epp", "epp:pd-always", "vllm-router:cache_aware", "round_robin"],
    )
    s["faulty"] = Scenario(
        name="faulty",
        description="one pod 3x slow, one pod dies after 10 s and comes back 10 s later",
        pool=pool_of(4, per_server=[{"slow_factor": 3.0}, {"die_after_s": 10.0,
                                                            "down_for_s": 10.0}], **_ENGINE),
        workload=WorkloadSpec(kind="shared_prefix", groups=8, system_tokens=1000,
                              output_tokens=32),
        rates=[3.0],
        requests_per_rate=200,
        default_routers=["round_robin", "vllm-router:power_of_two", "epp"],
    )
    s["overhead"] = Scenario(
        name="overhead",
        description="near-instant backends: max request rate and latency added by the router",
        pool=pool_of(4, preset="instant", time_scale=1.0),
        workload=WorkloadSpec(kind="overhead", question_tokens=20, output_tokens=1),
        rates=[100.0, 200.0, 400.0],
        requests_per_rate=1200,
        max_phase_s=20.0,
        slo_ttft_s=0.05,
        slo_tpot_s=1.0,
        default_routers=["round_robin", "vllm-router:round_robin", "sglang-router:round_robin",
                         "epp"],
    )
    s["tiny"] = Scenario(
        name="tiny",
        description="smoke: 2 fast pods, a handful of shared-prefix requests",
        pool=pool_of(2, preset="instant", first=2, time_scale=1.0, step_base_s=0.002),
        workload=WorkloadSpec(kind="shared_prefix", groups=2, system_tokens=200,
                              question_tokens=10, output_tokens=4),
        rates=[20.0],
        requests_per_rate=20,
        max_phase_s=15.0,
        default_routers=["round_robin"],
    )
    s["tiny_pd"] = Scenario(
        name="tiny_pd",
        description="smoke: 1 prefill + 1 decode fast pod, the EPP with a sidecar",
        pool=pool_of(2, preset="instant", roles=["prefill", "decode"], time_scale=1.0,
                     step_base_s=0.002),
        workload=WorkloadSpec(kind="shared_prefix", groups=2, system_tokens=600,
                              question_tokens=10, output_tokens=4),
        rates=[20.0],
        requests_per_rate=12,
        max_phase_s=15.0,
        default_routers=["epp"],
    )
    return s


SCENARIOS: dict[str, Scenario] = _registry()


def get(name: str) -> Scenario:
    if name not in SCENARIOS:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(sorted(SCENARIOS))}")
    return SCENARIOS[name]

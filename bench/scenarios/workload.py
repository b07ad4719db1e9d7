"""Seeded request schedules: what each scenario sends and when (open-loop Poisson)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "so", "du", "fa")


_PAIRS = tuple(tuple(a + b for b in _SYLLABLES) for a in _SYLLABLES)
_BITS = len(_SYLLABLES).bit_length()


def text_of(rng: random.Random, tokens: int) -> str:
    """About `tokens` simulator tokens of pseudo-words (each word is one token: <= 4 chars).
    Draws exactly what `rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES)` per word would
    (choice = getrandbits with rejection), inlined: bench.vsim builds 100k-request schedules."""
    bits = rng.getrandbits
    n = len(_SYLLABLES)
    words = []
    for _ in range(tokens):
        a = bits(_BITS)
        while a >= n:
            a = bits(_BITS)
        b = bits(_BITS)
        while b >= n:
            b = bits(_BITS)
        words.append(_PAIRS[a][b])
    return " ".join(words)


@dataclass(slots=True)
class RequestSpec:
    at: float  # seconds after the phase start (model time)
    messages: list[dict[str, str]]  # new messages for this request (after the session history)
    max_tokens: int
    session: str = ""  # non-empty: multi-turn; history is prepended by the driver
    group: str = ""  # shared-prefix group, for the oracle and reports
    prefix_tokens: int = 0  # tokens shared with other requests of the group
    headers: dict[str, str] = field(default_factory=dict)
    tenant: str = ""  # multi-tenant scenarios: who sent it (reports break results down)


@dataclass(slots=True)
class WorkloadSpec:
    kind: str = "shared_prefix"  # shared_prefix | multi_turn | mixed | overhead | multi_tenant
    groups: int = 8
    users_per_group: int = 4
    system_tokens: int = 2000
    question_tokens: int = 60
    output_tokens: int = 32
    turns: int = 4  # multi_turn
    long_fraction: float = 0.5  # mixed: share of long-prefill requests
    long_prompt_tokens: int = 3000
    short_prompt_tokens: int = 100
    long_output_tokens: int = 8
    short_output_tokens: int = 128
    burst_factor: float = 1.0  # >1: alternating bursts at rate*factor and lulls
    burst_period_s: float = 4.0
    # Group popularity: Zipf exponent over groups (0 = uniform), or the first `hot_groups`
    # groups carry `hot_fraction` of the traffic (the rest share what is left evenly).
    zipf_s: float = 0.0
    hot_groups: int = 0
    hot_fraction: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request
    # multi_tenant: tenant A (shared-prefix chat) sends `steady_rate`; tenant B (long fresh
    # prompts, `long_*` sizes) sends the rest of the phase's rate.
    steady_rate: float = 0.0
    tenant_header: str = "x-gateway-inference-fairness-id"


def arrivals(rng: random.Random, rate: float, count: int, spec: WorkloadSpec) -> list[float]:
    """Poisson arrivals (model seconds); with bursts the rate alternates high/low so that
    the mean stays `rate`."""
    out: list[float] = []
    t = 0.0
    for _ in range(count):
        r = rate
        if spec.burst_factor > 1.0:
            high = (t % spec.burst_period_s) < spec.burst_period_s / 2
            r = rate * (spec.burst_factor if high else max(2.0 - spec.burst_factor, 0.1))
        t += rng.expovariate(r)
        out.append(t)
    return out


def group_weights(spec: WorkloadSpec) -> list[float]:
    n = spec.groups
    if spec.hot_groups > 0 and 0 < spec.hot_fraction < 1 and spec.hot_groups < n:
        hot = spec.hot_fraction / spec.hot_groups
        cold = (1 - spec.hot_fraction) / (n - spec.hot_groups)
        return [hot if g < spec.hot_groups else cold for g in range(n)]
    if spec.zipf_s > 0:
        return [1.0 / (g + 1) ** spec.zipf_s for g in range(n)]
    return [1.0] * n


def _shared_prefix(
    spec: WorkloadSpec, times: list[float], rng: random.Random, text_rng: random.Random,
    tenant: str = "",
) -> list[RequestSpec]:
    systems = [text_of(text_rng, spec.system_tokens) for _ in range(spec.groups)]
    weights = group_weights(spec)
    uniform = len(set(weights)) == 1
    groups = range(spec.groups)
    headers = dict(spec.headers)
    if tenant:
        headers[spec.tenant_header] = tenant
    out = []
    for t in times:
        # randrange for uniform popularity keeps the schedules of earlier results
        g = rng.randrange(spec.groups) if uniform else rng.choices(groups, weights)[0]
        u = rng.randrange(spec.users_per_group)
        q = text_of(rng, spec.question_tokens)
        msgs = [
            {"role": "system", "content": systems[g]},
            {"role": "user", "content": f"user{u}: {q}"},
        ]
        out.append(
            RequestSpec(t, msgs, spec.output_tokens, group=f"g{g}",
                        prefix_tokens=spec.system_tokens, headers=headers, tenant=tenant)
        )
    return out


def _multi_tenant(
    spec: WorkloadSpec, rate: float, count: int, rng: random.Random, text_rng: random.Random
) -> list[RequestSpec]:
    """Tenant A: shared-prefix chat at `steady_rate`. Tenant B: long fresh prompts at
    `rate - steady_rate`. `count` requests in all, split in proportion to the rates."""
    steady = min(spec.steady_rate, rate)
    other = rate - steady
    n_a = round(count * steady / rate) if rate > 0 else count
    n_b = count - n_a
    calm = WorkloadSpec(**{**_fields(spec), "burst_factor": 1.0})
    out = _shared_prefix(spec, arrivals(rng, steady, n_a, calm), rng, text_rng, "tenant-a")
    if n_b and other > 0:
        headers = {**spec.headers, spec.tenant_header: "tenant-b"}
        for t in arrivals(rng, other, n_b, calm):
            msgs = [{"role": "user", "content": text_of(rng, spec.long_prompt_tokens)}]
            out.append(RequestSpec(t, msgs, spec.long_output_tokens, group="long",
                                   headers=headers, tenant="tenant-b"))
    out.sort(key=lambda r: r.at)
    return out


def _fields(spec: WorkloadSpec) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(spec)


def build(spec: WorkloadSpec, rate: float, count: int, seed: int) -> list[RequestSpec]:
    rng = random.Random(seed)
    text_rng = random.Random(seed * 7919 + 1)
    if spec.kind == "multi_tenant":
        return _multi_tenant(spec, rate, count, rng, text_rng)
    times = arrivals(rng, rate, count, spec)
    if spec.kind == "shared_prefix":
        return _shared_prefix(spec, times, rng, text_rng)
    if spec.kind == "multi_turn":
        # Sessions start over time; each session sends `turns` requests, the driver chains
        # them (a turn waits for the previous reply) and prepends the history.
        systems = [text_of(text_rng, spec.system_tokens) for _ in range(spec.groups)]
        out = []
        n_sessions = max(1, count // spec.turns)
        session_times = times[:n_sessions]
        for i, t0 in enumerate(session_times):
            g = rng.randrange(spec.groups)
            for turn in range(spec.turns):
                msgs = [{"role": "user", "content": text_of(rng, spec.question_tokens)}]
                if turn == 0:
                    msgs.insert(0, {"role": "system", "content": systems[g]})
                at = t0 + turn * rng.uniform(1.0, 3.0)  # user think time between turns
                out.append(
                    RequestSpec(at, msgs, spec.output_tokens, session=f"s{i}", group=f"g{g}",
                                prefix_tokens=spec.system_tokens)
                )
        out.sort(key=lambda r: r.at)
        return out
    if spec.kind == "mixed":
        out = []
        for t in times:
            if rng.random() < spec.long_fraction:
                msgs = [{"role": "user", "content": text_of(rng, spec.long_prompt_tokens)}]
                out.append(RequestSpec(t, msgs, spec.long_output_tokens, group="long",
                                       headers=dict(spec.headers)))
            else:
                msgs = [{"role": "user", "content": text_of(rng, spec.short_prompt_tokens)}]
                out.append(RequestSpec(t, msgs, spec.short_output_tokens, group="short",
                                       headers=dict(spec.headers)))
        return out
    if spec.kind == "overhead":
        return [
            RequestSpec(t, [{"role": "user", "content": text_of(rng, spec.question_tokens)}],
                        spec.output_tokens)
            for t in times
        ]
    raise ValueError(f"unknown workload kind {spec.kind!r}")


def describe(spec: WorkloadSpec) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(spec)

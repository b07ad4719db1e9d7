"""Workloads for the virtual-time simulator: what each client request is and when it is sent.

Sources: the bench scenarios' generators at any scale (`bench.scenarios.workload.build`),
trace replay from JSONL (Mooncake / BurstGPT style), and two shapes on top of any of them:
Zipf-popular prefix groups (the scenarios' `zipf_s`) and a diurnal rate curve (a time warp
of the Poisson arrivals).

Prompts are tokenized with the simulator's tokenizer (`epp.sim.tokenizer`, a dependency:
whatever it is, it is called, never re-implemented), one chat message at a time and
memoized, so a 2,000-token system prompt shared by 100k requests is tokenized once. That
is exact when the tokenizer splits at message boundaries (checked on the first requests of
every run: `TokenCache.additive`); otherwise whole prompts are tokenized.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.scenarios.workload import RequestSpec, text_of
from epp.sim.kvcache import ROOT_HASH, chain_hash
from epp.sim.tokenizer import encode, render_chat

_GEN_PROMPT = render_chat([], add_generation_prompt=True)
# Long messages (system prompts, trace blocks) tokenized once per process, not once per run:
# a policy sweep calls `run` again and again on the same schedules.
_LONG_CHARS = 2048
_SHARED: dict[tuple[str, str], list[int]] = {}
_SHARED_MAX = 20_000


class TokenCache:
    """Token ids of chat prompts, memoized per message, and the engine's block hashes of
    their shared leading messages (a system prompt is hashed once, not per request)."""

    def __init__(self, block_size: int = 16) -> None:
        self._msg: dict[tuple[str, str], list[int]] = {}
        self._gen = encode(_GEN_PROMPT)
        self.additive: bool | None = None  # unknown until checked
        self._checks = 0
        self.block_size = block_size
        self._prefix_hashes: dict[tuple[int, ...], list[int]] = {}
        self._last_segments: list[list[int]] = []

    def leading_hashes(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Chained block hashes of the full blocks inside every message but the last (what
        requests of a group or turns of a session share); [] when unknown."""
        if self.additive is False or len(messages) < 2:
            return []
        segs = [self.message(m) for m in messages[:-1]]
        key = tuple(id(s) for s in segs)
        hashes = self._prefix_hashes.get(key)
        if hashes is None:
            bs = self.block_size
            shorter = self._prefix_hashes.get(key[:-1], []) if len(key) > 1 else []
            ids = [t for s in segs for t in s]
            hashes = list(shorter)
            parent = hashes[-1] if hashes else ROOT_HASH
            for j in range(len(hashes), len(ids) // bs):
                parent = chain_hash(parent, ids[j * bs : (j + 1) * bs])
                hashes.append(parent)
            self._prefix_hashes[key] = hashes
        return hashes

    def message(self, m: dict[str, str]) -> list[int]:
        key = (m.get("role", "user"), m.get("content", ""))
        ids = self._msg.get(key)
        if ids is None:
            long = len(key[1]) >= _LONG_CHARS
            ids = _SHARED.get(key) if long else None
            if ids is None:
                ids = encode(render_chat([m], add_generation_prompt=False))
                if long:
                    if len(_SHARED) >= _SHARED_MAX:
                        _SHARED.clear()
                    _SHARED[key] = ids
            self._msg[key] = ids  # keeps the list alive: leading_hashes keys on its id
        return ids

    def prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        if self.additive is False:
            return encode(render_chat(list(messages)))
        ids: list[int] = []
        for m in messages:
            ids += self.message(m)
        ids += self._gen
        if self._checks < 8:  # verify additivity on the first prompts of a run
            self._checks += 1
            whole = encode(render_chat(list(messages)))
            if whole != ids:
                self.additive = False
                return whole
            self.additive = True
        return ids


@dataclass(slots=True, eq=False)
class VRequest:
    """One client request in the simulation (times in model seconds)."""

    idx: int
    at: float  # scheduled send time
    messages: list[dict[str, str]]  # new messages (a session prepends its history)
    max_tokens: int
    group: str = ""
    session: str = ""
    tenant: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    prefix_tokens: int = 0
    # Filled by the simulation.
    full_messages: list[dict[str, str]] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    sent: float = -1.0
    first_token: float = 0.0
    end: float = 0.0
    status: int = 0
    error: str = ""
    cached_tokens: int = 0
    output_tokens: int = 0
    server: str = ""
    reply: str = ""
    decision: Any = None  # the EPP's Decision, or the baseline router's pick
    pod: Any = None
    engine_req: Any = None
    predicted_uncached: int = -1  # the router's estimate, when it makes one
    remote_kv: bool = False  # P/D: the prompt's KV comes from the prefill pod
    audit: tuple[int, int] | None = None  # (cached tokens on the chosen pod, best pod's)

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and self.output_tokens > 0


def from_specs(specs: Iterable[RequestSpec]) -> list[VRequest]:
    out = []
    for i, s in enumerate(specs):
        out.append(
            VRequest(
                idx=i, at=s.at, messages=s.messages, max_tokens=s.max_tokens, group=s.group,
                session=s.session, tenant=s.tenant, headers=dict(s.headers),
                prefix_tokens=s.prefix_tokens,
            )
        )
    return out


# ---- diurnal rate curve ---------------------------------------------------------------------
def diurnal_warp(
    requests: list[VRequest], *, period_s: float, amplitude: float, phase: float = 0.0
) -> list[VRequest]:
    """Turn Poisson arrivals at a constant rate into arrivals whose rate follows
    `1 + amplitude * sin(2*pi*t/period + phase)` times the mean (same count, same mean
    rate): each time t maps to the s where the curve's integral reaches t."""
    if not 0 <= amplitude < 1:
        raise ValueError("diurnal amplitude must be in [0, 1)")
    if amplitude == 0 or not requests:
        return requests
    w = 2 * math.pi / period_s

    def cumulative(s: float) -> float:
        return s - amplitude / w * (math.cos(w * s + phase) - math.cos(phase))

    for r in requests:
        t = r.at
        lo, hi = t / (1 + amplitude), t / (1 - amplitude)
        for _ in range(60):  # bisection: cumulative() is increasing
            mid = (lo + hi) / 2
            if cumulative(mid) < t:
                lo = mid
            else:
                hi = mid
        r.at = (lo + hi) / 2
    requests.sort(key=lambda r: r.at)
    return requests


# ---- trace replay --------------------------------------------------------------------------
def _block_text(hash_id: int, tokens: int) -> str:
    return text_of(random.Random(hash_id * 1_000_003 + 17), tokens)


def load_trace(
    path: str | Path, *, block_tokens: int = 512, limit: int = 0, time_scale: float = 1.0,
    default_output: int = 128,
) -> list[VRequest]:
    """Replay a JSONL trace. Per line: arrival as `timestamp` (ms, Mooncake) or `t` / `at` /
    `arrival` (s); the prompt as `hash_ids` (Mooncake: one id per `block_tokens`-token
    block; equal ids mean equal content, so shared prefixes are shared) and/or
    `input_length` / `prompt_tokens` (tokens; beyond the blocks it is fresh text);
    `output_length` / `output_tokens`; optional `session`, `tenant`. Arrivals are shifted to
    start at 0 and divided by `time_scale` (> 1 replays faster)."""
    out: list[VRequest] = []
    blocks: dict[int, str] = {}
    t_first: float | None = None
    with Path(path).open("rb") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            rec = orjson.loads(line)
            if "timestamp" in rec:
                t = float(rec["timestamp"]) / 1000.0
            else:
                t = float(rec.get("t", rec.get("at", rec.get("arrival", 0.0))))
            if t_first is None:
                t_first = t
            hash_ids = rec.get("hash_ids") or []
            length = int(rec.get("input_length", rec.get("prompt_tokens", 0)) or 0)
            parts = []
            for h in hash_ids:
                text = blocks.get(h)
                if text is None:
                    text = blocks[h] = _block_text(int(h), block_tokens)
                parts.append(text)
            covered = len(hash_ids) * block_tokens
            if length > covered:
                parts.append(text_of(random.Random(n * 7 + 3), length - covered))
            if not parts:
                parts.append(text_of(random.Random(n * 7 + 3), 16))
            output = int(rec.get("output_length", rec.get("output_tokens", default_output)))
            group = f"h{hash_ids[0]}" if hash_ids else ""
            out.append(
                VRequest(
                    idx=len(out), at=(t - t_first) / time_scale,
                    messages=[{"role": "user", "content": " ".join(parts)}],
                    max_tokens=max(1, output), group=group,
                    session=str(rec.get("session", "") or ""),
                    tenant=str(rec.get("tenant", "") or ""),
                    prefix_tokens=min(covered, length) if length else covered,
                )
            )
            if limit and len(out) >= limit:
                break
    out.sort(key=lambda r: r.at)
    for i, r in enumerate(out):
        r.idx = i
    return out


def write_trace(requests: Sequence[VRequest], path: str | Path) -> None:
    """Write a schedule as JSONL in the format `load_trace` reads (lengths only)."""
    tc = TokenCache()
    with Path(path).open("wb") as f:
        for r in requests:
            rec: dict[str, Any] = {"t": r.at, "input_length": len(tc.prompt(r.messages)),
                   "output_length": r.max_tokens}
            if r.session:
                rec["session"] = r.session
            f.write(orjson.dumps(rec) + b"\n")



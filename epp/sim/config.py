"""Simulated server configuration: engine shape, cost model, role, failure injection.

Costs are in model seconds (what a real GPU would take); `time_scale` multiplies every
engine duration into wall-clock time, so `time_scale=4` runs four times slower than the
modelled hardware and leaves a small machine room to stay faithful.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROLES = ("both", "prefill", "decode")
ENGINES = ("vllm", "sglang")


@dataclass(slots=True)
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    engine: str = "vllm"  # metric names: vllm | sglang
    role: str = "both"
    # --- engine shape
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_gpu_blocks: int = 27_000  # ~56 GB of KV at 128 KB/token
    max_model_len: int = 32_768
    enable_prefix_caching: bool = True
    # --- cost model (model seconds)
    step_base_s: float = 0.010  # fixed cost of one engine forward step
    prefill_per_token_s: float = 0.000_25
    decode_per_seq_s: float = 0.000_05
    decode_per_ctx_token_s: float = 0.000_000_2
    api_overhead_s: float = 0.020  # HTTP/tokenize/detokenize, paid once per request
    kv_bytes_per_token: int = 131_072
    kv_transfer_gbps: float = 25.0  # GB/s between prefill and decode pods
    kv_transfer_latency_s: float = 0.002
    time_scale: float = 1.0
    # --- failure injection
    error_rate: float = 0.0  # fraction of requests answered 500
    slow_factor: float = 1.0  # multiplies step time
    die_after_s: float = 0.0  # 0 = never; stop serving this long after start
    down_for_s: float = 0.0  # then come back (empty cache) after this long; 0 = stay dead
    max_waiting: int = 0  # 0 = unbounded; else 429 when the waiting queue is this long
    # --- KV events (ZMQ PUB on host:kv_events_port) ; 0 = off
    kv_events_port: int = 0
    kv_events_replay_port: int = 0  # ROUTER serving missed batches (vLLM replay_endpoint)
    seed: int = 0
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def replace(self, **changes: Any) -> SimConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.block_size < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens, block_size must be >= 1")
        if self.num_gpu_blocks < 1 or self.time_scale <= 0 or self.slow_factor <= 0:
            raise ValueError("num_gpu_blocks, time_scale and slow_factor must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Presets: only cost/shape fields; host/port/role come from the pool layout.
PRESETS: dict[str, dict[str, Any]] = {
    # Llama-3.1-8B on one H100 80GB: ITL ≈ 12 ms, prefill ≈ 250 µs/token + 30 ms,
    # KV ≈ 128 KB/token (published vLLM measurements).
    "h100-8b": {},
    # Same costs, a deliberately small KV cache so eviction shows on short runs.
    "h100-8b-small-kv": {"num_gpu_blocks": 2_000},
    # Near-instant backend to measure router overhead.
    "instant": {
        "step_base_s": 0.0002,
        "prefill_per_token_s": 0.0,
        "decode_per_seq_s": 0.0,
        "decode_per_ctx_token_s": 0.0,
        "api_overhead_s": 0.0,
        "kv_transfer_latency_s": 0.0,
    },
}

_FIELDS = {f.name for f in dataclasses.fields(SimConfig)}


def make_config(preset: str = "h100-8b", **overrides: Any) -> SimConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    values = {**PRESETS[preset], **overrides}
    unknown = set(values) - _FIELDS
    if unknown:
        raise ValueError(f"unknown simulator settings: {sorted(unknown)}")
    cfg = SimConfig(**values)
    cfg.validate()
    return cfg


def expand_servers(
    count: int, base_ip: str = "127.0.0.1", port: int = 8000, ports: list[int] | None = None
) -> list[tuple[str, int]]:
    """`count` servers on consecutive loopback IPs from `base_ip` (all on `port`), or on
    `ports` of `base_ip` when `ports` is given."""
    if ports:
        return [(base_ip, p) for p in ports]
    if base_ip == "0.0.0.0":  # all interfaces: one server in a pod (ModelPool engine `sim`)
        if count != 1:
            raise ValueError("--base-ip 0.0.0.0 serves one simulator only")
        return [(base_ip, port)]
    a, b, c, d = (int(x) for x in base_ip.split("."))
    if a != 127:
        raise ValueError("simulated servers bind loopback addresses only (127.x.y.z)")
    out = []
    for i in range(count):
        n = d + i
        if n > 254:
            raise ValueError("too many servers for one /24 loopback range")
        out.append((f"{a}.{b}.{c}.{n}", port))
    return out


def load_configs(path: str | Path) -> list[SimConfig]:
    """YAML: `defaults: {preset: h100-8b, ...}` and `servers: [{host, port, role, ...}]`,
    or `count/base_ip/port` instead of an explicit `servers` list."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return configs_from_dict(data)


def configs_from_dict(data: dict[str, Any]) -> list[SimConfig]:
    defaults = dict(data.get("defaults") or {})
    preset = str(defaults.pop("preset", "h100-8b"))
    servers = data.get("servers")
    if servers is None:
        layout = expand_servers(
            int(data.get("count", 1)),
            str(data.get("base_ip", "127.0.0.1")),
            int(data.get("port", 8000)),
            data.get("ports"),
        )
        servers = [{"host": h, "port": p} for h, p in layout]
    out = []
    for s in servers:
        s = dict(s)
        p = str(s.pop("preset", preset))
        out.append(make_config(p, **{**defaults, **s}))
    return out

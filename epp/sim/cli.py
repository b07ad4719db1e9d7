"""`python -m epp.sim` / `epp sim`: run simulated vLLM (or SGLang) servers until killed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import Any

from epp.sim.config import PRESETS, SimConfig, expand_servers, load_configs, make_config
from epp.sim.pool import start_pool, stop_pool

# Flags mapped 1:1 onto SimConfig fields (None = keep the preset's value).
_OVERRIDES: list[tuple[str, type, str]] = [
    ("model", str, "served model name"),
    ("engine", str, "metric names: vllm | sglang"),
    ("role", str, "both | prefill | decode"),
    ("max_num_seqs", int, "max running sequences"),
    ("max_num_batched_tokens", int, "token budget per step (chunked prefill)"),
    ("block_size", int, "KV block size in tokens"),
    ("num_gpu_blocks", int, "KV cache size in blocks"),
    ("max_model_len", int, "max prompt + output tokens"),
    ("step_base_s", float, "fixed cost of one engine step (model s)"),
    ("prefill_per_token_s", float, "prefill cost per uncached token (model s)"),
    ("decode_per_seq_s", float, "decode cost per running sequence (model s)"),
    ("decode_per_ctx_token_s", float, "decode cost per context token (model s)"),
    ("api_overhead_s", float, "per-request API overhead (model s)"),
    ("kv_transfer_gbps", float, "P/D KV transfer bandwidth (GB/s)"),
    ("time_scale", float, "wall seconds per model second (>1 = slower, more faithful)"),
    ("error_rate", float, "fraction of requests answered 500"),
    ("slow_factor", float, "multiply step time (slow pod)"),
    ("die_after_s", float, "stop serving after this many model seconds (0 = never)"),
    ("down_for_s", float, "come back after this many model seconds (0 = stay down)"),
    ("max_waiting", int, "answer 429 when this many requests wait (0 = unbounded)"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML pool file (defaults + servers); flags override")
    parser.add_argument("--preset", default="h100-8b", choices=sorted(PRESETS),
                        help="engine cost and KV-cache shape")
    parser.add_argument("--servers", type=int, default=1, help="number of servers")
    parser.add_argument("--base-ip", default="127.0.0.1", help="first loopback IP")
    parser.add_argument("--port", type=int, default=8000, help="port on every IP")
    parser.add_argument("--ports", default="", help="comma list of ports on --base-ip instead")
    parser.add_argument(
        "--kv-events-port", type=int, default=0, help="ZMQ PUB port (server i uses port+i)"
    )
    parser.add_argument(
        "--kv-events-replay-port",
        type=int,
        default=0,
        help="ZMQ ROUTER port replaying missed KV-event batches (server i uses port+i; 0 = off)",
    )
    for name, typ, help_text in _OVERRIDES:
        parser.add_argument("--" + name.replace("_", "-"), type=typ, default=None,
                            help=f"{help_text} (default: the preset's)")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="disable automatic prefix caching (on by default)")


def build_configs(args: argparse.Namespace) -> list[SimConfig]:
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name, _, _ in _OVERRIDES if getattr(args, name) is not None
    }
    if args.no_prefix_caching:
        overrides["enable_prefix_caching"] = False
    if args.config:
        base = load_configs(args.config)
        configs = [c.replace(**overrides) for c in base]
    else:
        ports = [int(p) for p in args.ports.split(",") if p.strip()] if args.ports else None
        layout = expand_servers(args.servers, args.base_ip, args.port, ports)
        configs = [make_config(args.preset, host=h, port=p, **overrides) for h, p in layout]
    if args.kv_events_port:
        configs = [
            c.replace(kv_events_port=args.kv_events_port + i) for i, c in enumerate(configs)
        ]
    if args.kv_events_replay_port:
        configs = [
            c.replace(kv_events_replay_port=args.kv_events_replay_port + i)
            for i, c in enumerate(configs)
        ]
    for c in configs:
        c.validate()
    return configs


async def _serve(configs: list[SimConfig]) -> None:
    handles = await start_pool(configs)
    for h in handles:
        c = h.config
        print(f"sim {c.engine} {c.role} {h.url} model={c.model} scale={c.time_scale}", flush=True)
    print("READY", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await stop_pool(handles)


def run(args: argparse.Namespace) -> int:
    try:
        configs = build_configs(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(configs))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m epp.sim", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args())

"""`python -m bench.vsim SCENARIO`: routers side by side in virtual time.

    python -m bench.vsim shared_prefix                                  # scenario's rates
    python -m bench.vsim shared_prefix --routers epp,cache_aware --rates 8,12
    python -m bench.vsim shared_prefix --pool-size 64 --requests 20000  # rate scales too
    python -m bench.vsim shared_prefix --trace mooncake.jsonl --pool-size 32
    python -m bench.vsim scale shared_prefix --sizes 4,16,64,256        # the scale study

Prints one row per router x rate (model seconds) and, with --out, writes results.json in
the format `bench.run` writes (so `bench.report` and `bench.vsim.validate` read it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench.scenarios import SCENARIOS, get
from bench.vsim.api import run
from bench.vsim.routers import ROUTERS

DEFAULT_ROUTERS = "round_robin,least_loaded,power_of_two,cache_aware,epp"


def _f(v: Any, d: int = 3) -> str:
    return f"{v:.{d}f}" if isinstance(v, float) else str(v)


def _audit(s: dict[str, Any]) -> str:
    a = s["decisions"].get("audit")
    if not a:
        return "-"
    return f"{a['passed_over_share']:.2f} ({a['missed_cached_share']:.2f} of tokens)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "scale":
        from bench.vsim.scale import main as scale_main

        return scale_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.vsim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--routers", default=DEFAULT_ROUTERS,
                   help=f"comma list from {', '.join(ROUTERS)}, epp:<variant> "
                   f"(default {DEFAULT_ROUTERS})")
    p.add_argument("--rates", default="",
                   help="req/s, comma list (default: the scenario's, scaled with the pool)")
    p.add_argument("--pool-size", type=int, default=0,
                   help="pods (default: the scenario's; more pods cycle its pod shapes)")
    p.add_argument("--requests", type=int, default=0,
                   help="requests per rate (default: the scenario's)")
    p.add_argument("--seed", type=int, default=None,
                   help="schedule seed (default: the harness's seed for each rate)")
    p.add_argument("--router-seed", type=int, default=None,
                   help="seed of the routers' random tie-breaks (default: the schedule seed)")
    p.add_argument("--time-scale", type=float, default=None,
                   help="EPP clock / model time (default: the scenario's, like the harness; "
                   "1 = production speed)")
    p.add_argument("--response-body", action="store_true",
                   help="the gateway sends response bodies to the EPP (first token, usage); "
                   "default: headers only, like bench.run")
    p.add_argument("--epp-config", default="",
                   help="EndpointPickerConfig file for `epp` (default: the built-in one)")
    p.add_argument("--no-scale-groups", action="store_true",
                   help="keep the scenario's prefix-group count on bigger pools (default: "
                   "groups grow with the pool)")
    p.add_argument("--trace", default="",
                   help="replay this JSONL trace instead of the scenario's schedule "
                   "(default: none)")
    p.add_argument("--zipf", type=float, default=None,
                   help="Zipf exponent of prefix-group popularity (default: the scenario's)")
    p.add_argument("--diurnal-period", type=float, default=0.0,
                   help="diurnal rate curve period in model seconds (default 0 = off)")
    p.add_argument("--diurnal-amplitude", type=float, default=0.0,
                   help="diurnal amplitude, 0..1 of the mean rate (default 0)")
    p.add_argument("--pd-sidecar", default="auto", choices=("auto", "on", "off"),
                   help="P/D pools: run the prefill hop the router picks (a decode-pod "
                   "sidecar); auto = for epp routers, as bench.run does (default auto)")
    p.add_argument("--kv-events", action="store_true",
                   help="deliver the engines' KV events to the EPP for any config (default: "
                   "only for configs with the precise-prefix-cache-scorer)")
    p.add_argument("--audit", action="store_true",
                   help="check every pick against every pod's cache (decisions.audit: how "
                   "often the router passed over a pod holding more of the prompt); slow on "
                   "big pools (default off)")
    p.add_argument("--out", default="",
                   help="write results.json (bench.run format) here (default: print only)")
    args = p.parse_args(argv)

    sc = get(args.scenario)
    factor = (args.pool_size or len(sc.pool)) / len(sc.pool)
    rates = [float(x) for x in args.rates.split(",") if x] or [r * factor for r in sc.rates]
    config_text = Path(args.epp_config).read_text() if args.epp_config else None
    routers = [r for r in args.routers.split(",") if r]
    phases = []
    print("| router | rate | done/sent | TTFT p50 | TTFT p90 | TPOT p50 | E2E p90 | out tok/s "
          "| cached | SLO | goodput | passed over | sim s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for router in routers:
        for rate in rates:
            t0 = time.perf_counter()
            s = run(
                sc, router, epp_config_text=config_text, pool_size=args.pool_size or None,
                requests=args.requests or None, rate=rate, seed=args.seed,
                router_seed=args.router_seed, time_scale=args.time_scale,
                response_body=args.response_body, scale_groups=not args.no_scale_groups,
                trace=args.trace or None, zipf_s=args.zipf,
                diurnal_period_s=args.diurnal_period,
                diurnal_amplitude=args.diurnal_amplitude,
                pd_sidecar=None if args.pd_sidecar == "auto" else args.pd_sidecar == "on",
                kv_events=args.kv_events, audit=args.audit,
            )
            wall = time.perf_counter() - t0
            print(f"| {router} | {rate:g} | {s['completed']}/{s['sent']} | {_f(s['ttft_p50'])} "
                  f"| {_f(s['ttft_p90'])} | {_f(s['tpot_p50'], 4)} | {_f(s['e2e_p90'])} "
                  f"| {_f(s['output_throughput'], 1)} | {_f(s['cached_ratio'], 2)} "
                  f"| {_f(s['slo_attainment'], 2)} | {_f(s['goodput'], 2)} "
                  f"| {_audit(s)} | {wall:.1f} |",
                  flush=True)
            phases.append({"router": router, "rate": rate, "summary": s,
                           "per_pod": s["per_pod"]})
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        scd = sc.to_dict()
        data = {"command": "python -m bench.vsim " + " ".join(argv), "scenario": scd,
                "phases": phases, "skipped": {}, "simulated": True}
        (out / "results.json").write_bytes(
            orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY
                         | orjson.OPT_NON_STR_KEYS, default=str)
        )
        print(f"wrote {out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

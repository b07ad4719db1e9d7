"""`python -m bench.run SCENARIO [--routers a,b] [--quick]`: routers side by side.

Starts the simulated pool once (a `epp.sim` subprocess), then each router in turn in
front of it; for every offered load replays the same seeded open-loop schedule, with the
pods' caches reset before each phase; writes bench/results/<scenario>/ (results.json,
results.md, PNG plots).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from bench import report, terminable
from bench.routers import RouterSpec, RouterUnavailable, launch, prepare_pool
from bench.scenarios import SCENARIOS, Scenario, get
from bench.scenarios.driver import drive, sample_pods
from bench.scenarios.oracle import oracle
from bench.scenarios.workload import build
from epp.sim.config import SimConfig

RESULTS = Path(__file__).parent / "results"


class SimPool:
    """The simulated pool as a child process (keeps the load driver's loop free)."""

    def __init__(self, configs: list[SimConfig], workdir: Path) -> None:
        self.configs = configs
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.urls = [f"http://{c.address}" for c in configs]

    def _spawn(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "pool.yaml"
        cfg.write_text(yaml.safe_dump({"servers": [c.to_dict() for c in self.configs]}))
        with (self.workdir / "sim.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "epp.sim", "--config", str(cfg)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    async def __aenter__(self) -> SimPool:
        self._spawn()
        assert self.proc is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"simulator exited: {(self.workdir / 'sim.log').read_text()}")
            if b"READY" in (self.workdir / "sim.log").read_bytes():
                return self
            await asyncio.sleep(0.1)
        raise RuntimeError("simulator did not become ready in 30 s")

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    async def reset(self) -> None:
        """Clear every pod's prefix cache and counters (waits for pods to drain)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            for u in self.urls:
                for _ in range(100):
                    try:
                        async with http.post(u + "/sim/reset") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass  # a pod that is down has nothing to reset
                        break
                    await asyncio.sleep(0.2)

    async def states(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            for u in self.urls:
                try:
                    async with http.get(u + "/sim/state") as r:
                        out[u.removeprefix("http://")] = await r.json()
                except aiohttp.ClientError:
                    out[u.removeprefix("http://")] = {"alive": False}
        return out


def _write_requests(path: Path, results: list[Any]) -> None:
    """One JSON line per request (wall seconds, no ITLs) next to the router's log: for reading
    a phase's tail request by request."""
    with path.open("w") as f:
        for r in results:
            row = {k: v for k, v in dataclasses.asdict(r).items() if k != "itls"}
            f.write(orjson.dumps(row).decode() + "\n")


async def run_scenario(
    sc: Scenario, routers: list[str], out: Path, *, router_port: int = 18180,
    command: str = "",
) -> dict[str, Any]:
    raw = out / "raw"
    sc = dataclasses.replace(sc, pool=prepare_pool(routers, sc.pool))  # KV events if needed
    model = sc.pool[0].model
    schedules = {
        rate: build(sc.workload, rate, sc.requests_per_rate, sc.seed + i)
        for i, rate in enumerate(sc.rates)
    }
    data: dict[str, Any] = {
        "command": command,
        "scenario": sc.to_dict(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "phases": [],
        "skipped": {},
        "oracle": {str(r): oracle(sc.pool, s, r) for r, s in schedules.items()},
    }
    async with SimPool(sc.pool, raw) as pool:
        for i, name in enumerate(routers):
            spec = RouterSpec.parse(name)
            if spec.kind == "oracle":
                continue  # always computed
            port = router_port + 10 * i
            try:
                async with launch(spec, sc.pool, port, raw) as url:
                    for rate in sc.rates:
                        await pool.reset()
                        print(f"[{sc.name}] {spec.name} @ {rate:g} req/s ...", flush=True)
                        stop = asyncio.Event()
                        sampler = asyncio.create_task(sample_pods(pool.urls, stop))
                        schedule = schedules[rate]
                        bound = sc.max_phase_s or (
                            (schedule[-1].at if schedule else 0.0) * sc.time_scale + 60.0
                        )
                        results, wall = await drive(
                            url, model, schedule, time_scale=sc.time_scale, max_wall_s=bound,
                        )
                        stop.set()
                        _write_requests(raw / f"{spec.name.replace(':', '_')}@{rate:g}.jsonl",
                                        results)  # fmt: skip
                        samples = await sampler
                        states = await pool.states()
                        summary = report.summarize(
                            results, wall_s=wall, time_scale=sc.time_scale,
                            slo_ttft_s=sc.slo_ttft_s, slo_tpot_s=sc.slo_tpot_s,
                            scheduled=len(schedules[rate]),
                        )
                        print(
                            f"    done {summary['completed']}/{summary['sent']} "
                            f"TTFT p90 {summary['ttft_p90']:.3f}s "
                            f"out {summary['output_throughput']:.0f} tok/s "
                            f"cached {summary['cached_ratio']:.2f}"
                            + (f" pd {summary['pd_modes']}" if "pd_modes" in summary else ""),
                            flush=True,
                        )
                        per_pod = {k: v.get("requests_total", 0) for k, v in states.items()}
                        phase: dict[str, Any] = {
                            "router": spec.name,
                            "rate": rate,
                            "summary": summary,
                            "per_pod": per_pod,
                            "pod_states": states,
                            "pod_samples": samples,
                        }
                        costs = {c.address: c.labels.get("cost") for c in sc.pool}
                        if any(v is not None for v in costs.values()):
                            phase["pod_cost"] = sum(
                                n * float(costs.get(pod) or 1.0) for pod, n in per_pod.items()
                            )
                        data["phases"].append(phase)
            except RouterUnavailable as e:
                print(f"[{sc.name}] skipping {spec.name}: {e}", flush=True)
                data["skipped"][spec.name] = str(e)
    data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    report.write_all(out, data)
    return data


def _relocate(sc: Scenario, base_ip: str | None, port: int | None) -> Scenario:
    if base_ip is None and port is None:
        return sc
    pool = []
    for i, c in enumerate(sc.pool):
        host = c.host
        if base_ip is not None:
            a, b, cc, d = base_ip.split(".")
            host = f"{a}.{b}.{cc}.{int(d) + i}"
        pool.append(c.replace(host=host, port=port if port is not None else c.port))
    return dataclasses.replace(sc, pool=pool)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--routers", default="", help="comma list, e.g. round_robin,epp,"
                   "vllm-router:cache_aware,sglang-router:cache_aware (default: scenario's)")
    p.add_argument("--quick", action="store_true", help="fewer rates and requests")
    p.add_argument("--rates", default="", help="override the load sweep (req/s, comma list)")
    p.add_argument("--requests", type=int, default=0, help="override requests per rate")
    p.add_argument("--time-scale", type=float, default=0.0, help="override the pool time scale")
    p.add_argument("--seed", type=int, default=None,
                   help="schedule seed (default: the scenario's; rate i of the sweep uses seed + i)")
    p.add_argument("--max-phase-s", type=float, default=0.0, help="wall bound per phase")
    p.add_argument("--out", default="", help="output folder (default bench/results/<scenario>)")
    p.add_argument("--router-port", type=int, default=18180)
    p.add_argument("--sim-base-ip", default=None, help="move the pool to these loopback IPs")
    p.add_argument("--sim-port", type=int, default=None, help="move the pool to this port")
    args = p.parse_args(argv)

    sc = get(args.scenario)
    if args.quick:
        sc = sc.quick()
    if args.rates:
        sc = dataclasses.replace(sc, rates=[float(x) for x in args.rates.split(",")])
    if args.requests:
        sc = dataclasses.replace(sc, requests_per_rate=args.requests)
    if args.seed is not None:
        sc = dataclasses.replace(sc, seed=args.seed)
    if args.max_phase_s:
        sc = dataclasses.replace(sc, max_phase_s=args.max_phase_s)
    if args.time_scale:
        sc = dataclasses.replace(sc, pool=[c.replace(time_scale=args.time_scale) for c in sc.pool])
    sc = _relocate(sc, args.sim_base_ip, args.sim_port)
    routers = [r for r in args.routers.split(",") if r] or sc.default_routers
    out = Path(args.out) if args.out else RESULTS / sc.name
    command = "python -m bench.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    data = terminable.run(run_scenario(sc, routers, out, router_port=args.router_port,
                                    command=command))
    print(f"wrote {out}/results.md")
    return 0 if data["phases"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench.iperf.run`: inference-perf as the load driver against the harness' routers.

    python -m bench.iperf.run --routers epp,round_robin        # own sim pool + routers
    python -m bench.iperf.run --url http://127.0.0.1:18180     # a router already running

With `--routers`, starts the scenario's simulated pool (`bench.run.SimPool`, moved to
`--sim-base-ip`/a free port), then each router in turn through `bench.routers.launch`
(`epp` = our EPP behind Envoy via epp.devstack, `round_robin` = plain Envoy, peers if
installed); resets the pods' caches, runs inference-perf (separate Python 3.12 venv, see
`bench.iperf.env`) with the scenario's shared-prefix workload, bounded in wall time, and
collects its reports into `--out/<router>/` plus `summary.md` / `summary.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench import terminable
from bench.iperf.config import iperf_config, wall_bound_s, write_config
from bench.iperf.env import DEFAULT_VENV, OFFLINE_ENV, IperfEnv, ensure
from bench.iperf.summary import markdown, read_reports
from bench.routers import RouterSpec, RouterUnavailable, launch, prepare_pool
from bench.run import RESULTS, SimPool
from bench.scenarios import SCENARIOS, Scenario, get
from epp.devstack.procs import free_port

DEFAULT_OUT = RESULTS / "iperf"


class IperfFailed(Exception):
    pass


def relocate(sc: Scenario, base_ip: str, port: int) -> Scenario:
    """Move the scenario's pool to consecutive loopback IPs from `base_ip`, all on `port`."""
    a, b, c, d = base_ip.split(".")
    pool = [cfg.replace(host=f"{a}.{b}.{c}.{int(d) + i}", port=port)
            for i, cfg in enumerate(sc.pool)]
    return dataclasses.replace(sc, pool=pool)


def _printed_tables(log: str) -> str:
    """What inference-perf prints after its JSON report dumps: the rich summary tables."""
    cut = log.rfind("=== END_")
    if cut < 0:
        return log[-4000:]
    return log[log.find("\n", cut) + 1:]


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "?"


async def run_iperf(env: IperfEnv, cfg: dict[str, Any], workdir: Path) -> str:
    """Run inference-perf once; its reports land in cfg's storage path. Returns its output."""
    path = write_config(cfg, workdir / "iperf.yaml")
    log_path = workdir / "inference-perf.log"
    bound = wall_bound_s(cfg)
    child_env = {**os.environ, **OFFLINE_ENV, "COLUMNS": "200"}
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(env.inference_perf), "--config_file", str(path),
            stdout=log, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
            env=child_env, cwd=str(workdir), start_new_session=True,
        )
        try:
            rc = await asyncio.wait_for(proc.wait(), timeout=bound)
        except TimeoutError:
            rc = None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), timeout=10)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
    text = log_path.read_text(errors="replace")
    if rc is None:
        raise IperfFailed(f"inference-perf exceeded {bound:.0f} s (killed); see {log_path}")
    if rc != 0:
        raise IperfFailed(f"inference-perf exited {rc}: {text[-1500:]}")
    return text


async def drive(env: IperfEnv, sc: Scenario, url: str, name: str, out: Path,
                args: argparse.Namespace) -> dict[str, Any]:
    workdir = out / name.replace(":", "_")
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("*.json"):
        old.unlink()  # a previous run's reports must not be read back as this one's
    cfg = iperf_config(sc, url=url, tokenizer_dir=env.tokenizer_dir, report_dir=workdir,
                       rates=args.rates, stage_s=args.stage_s, model=args.model,
                       unique_questions=not args.cycle_prompts)
    rates_txt = ", ".join(f"{s['rate']:g}" for s in cfg["load"]["stages"])
    print(f"[iperf] {name} at {url}: {len(args.rates)} stage(s) x {args.stage_s} s at "
          f"{rates_txt} req/s wall", flush=True)
    t0 = time.monotonic()
    text = await run_iperf(env, cfg, workdir)
    print(_printed_tables(text), flush=True)
    result: dict[str, Any] = {"router": name, "url": url, "wall_s": time.monotonic() - t0,
                              "reports": str(workdir), **read_reports(workdir, sc.time_scale)}
    if not result["stages"]:
        raise IperfFailed(f"inference-perf wrote no stage reports in {workdir}")
    return result


async def run_all(env: IperfEnv, sc: Scenario, routers: list[str], out: Path,
                  args: argparse.Namespace) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    if args.url:
        try:
            runs.append(await drive(env, sc, args.url, args.name or "router", out, args))
        except IperfFailed as e:
            runs.append({"router": args.name or "router", "error": _last_line(str(e)),
                         "stages": []})
        return runs
    raw = out / "raw"
    sc = dataclasses.replace(sc, pool=prepare_pool(routers, sc.pool))  # KV events if needed
    async with SimPool(sc.pool, raw) as pool:
        for name in routers:
            spec = RouterSpec.parse(name)
            await pool.reset()
            port = args.router_port or free_port()
            try:
                async with launch(spec, sc.pool, port, raw) as url:
                    run = await drive(env, sc, url, spec.name, out, args)
                states = await pool.states()
                hits = sum(s.get("prefix_hits", 0) for s in states.values())
                queries = sum(s.get("prefix_queries", 0) for s in states.values())
                run["per_pod"] = {k: v.get("requests_total", 0) for k, v in states.items()}
                run["prefix_hit_ratio"] = hits / queries if queries else None
                runs.append(run)
            except (RouterUnavailable, IperfFailed) as e:
                print(f"[iperf] {spec.name} failed: {e}", flush=True)
                runs.append({"router": spec.name, "error": _last_line(str(e)), "stages": []})
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.iperf.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="shared_prefix", choices=sorted(
        n for n, s in SCENARIOS.items() if s.workload.kind == "shared_prefix"))
    p.add_argument("--routers", default="epp", help="comma list (bench.routers names)")
    p.add_argument("--url", default="", help="drive this running router instead")
    p.add_argument("--name", default="", help="label for --url in the report")
    p.add_argument("--model", default=None, help="model name (default: the scenario's)")
    p.add_argument("--rates", default="4,8",
                   help="req per MODEL second, one inference-perf stage each (wall = /scale)")
    p.add_argument("--stage-s", type=int, default=20, help="wall seconds per stage")
    p.add_argument("--cycle-prompts", action="store_true",
                   help="only users_per_group prompts per group, repeated (inference-perf's "
                   "usual shape) instead of a fresh question per request")
    p.add_argument("--time-scale", type=float, default=0.0, help="override the pool's")
    p.add_argument("--sim-base-ip", default="127.0.7.2")
    p.add_argument("--sim-port", type=int, default=0, help="0: a free port")
    p.add_argument("--router-port", type=int, default=0, help="0: a free port")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--setup", action="store_true", help="create the venv/tokenizer if missing")
    p.add_argument("--out", type=Path, default=None,
                   help=f"default {DEFAULT_OUT}, or {DEFAULT_OUT}/url-<name> with --url")
    args = p.parse_args(argv)
    args.rates = [float(x) for x in args.rates.split(",") if x.strip()]
    if args.out is None:
        args.out = DEFAULT_OUT / f"url-{args.name or 'router'}" if args.url else DEFAULT_OUT
    args.out = args.out.resolve()  # inference-perf runs with its report folder as cwd

    env = ensure(args.venv) if args.setup else IperfEnv(args.venv)
    if not env.ready():
        print(f"no inference-perf venv at {args.venv}: run `python -m bench.iperf.env` "
              "(or pass --setup)", file=sys.stderr)
        return 2
    sc = get(args.scenario)
    if args.time_scale:
        sc = dataclasses.replace(sc, pool=[c.replace(time_scale=args.time_scale)
                                           for c in sc.pool])
    sc = relocate(sc, args.sim_base_ip, args.sim_port or free_port(args.sim_base_ip))
    routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    runs = terminable.run(run_all(env, sc, routers, args.out, args))
    command = "python -m bench.iperf.run " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    doc = {"command": command, "scenario": sc.name, "time_scale": sc.time_scale,
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": runs}
    (args.out / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "summary.md").write_text(
        f"# inference-perf on `{sc.name}`\n\n`{command}`\n\nLatencies in model seconds "
        f"(wall / time scale {sc.time_scale:g}); throughput in wall time; prompt tokens as "
        f"the simulator counts them.\n\n{markdown(runs)}"
    )
    print(markdown(runs))
    print(f"wrote {args.out}/summary.md")
    return 0 if any(r.get("stages") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

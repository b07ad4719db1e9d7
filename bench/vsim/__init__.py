"""A virtual-time simulator: the EPP's real request control and scheduler in front of
hundreds of simulated pods, driven by scenario or trace workloads, in seconds to minutes.

    from bench.vsim import run
    s = run("shared_prefix", router="epp", rate=8)          # one phase -> summary dict
    s = run("shared_prefix", router="cache_aware", pool_size=64, requests=20_000)
    m = run_seeds("shared_prefix", "epp", rate=8)  # medians over 5 tie-break seeds

CLI: `python -m bench.vsim SCENARIO --routers epp,round_robin,cache_aware ...`
(see bench/README.md).
"""

from bench.vsim.api import resolve, run, run_seeds, scale_pool

__all__ = ["resolve", "run", "run_seeds", "scale_pool"]

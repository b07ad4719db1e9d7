"""Routers inside the virtual-time simulation: the EPP's real request control, and baselines.

Every router sees only what it sees in the real harness:

* `epp`: the product's `Director` + `Scheduler` + lifecycle hooks, built from an
  EndpointPickerConfig like `epp serve` does, fed scraped engine metrics (the simulation
  calls `apply_metrics` at the scrape interval) and the response events the gateway
  forwards: response headers (and, in `response_body` mode only, the first token and the
  usage at the end), the predicted-TTFT prefill timer, flow control's queue (pumped by its events and
  a 10 ms tick, like `epp serve`'s asyncio waiter), and the release when the ext_proc
  stream closes: with the harness's default gateway (response headers only) that is
  right after the response headers, not at the end of the stream;
* `round_robin`: Envoy's ROUND_ROBIN over every pod;
* `least_loaded`, `power_of_two`: the router's own in-flight counts (held until the
  stream ends, as a proxying router does);
* `cache_aware` (also named `vllm-router:cache_aware` / `sglang-router:cache_aware`): a
  RE-IMPLEMENTATION of those routers' cache_aware policy (`bench/vsim/radix.py`), with
  their defaults: cache_threshold 0.3, balance_abs_threshold 64, balance_rel_threshold
  1.5, eviction every 120 s (vllm-router) / 60 s (sglang-router) to 32M / 64M characters
  per worker. A match at or below the threshold goes to the least-loaded worker, the
  first in the router's (arbitrary, fixed) worker order on ties: vllm-router's current
  source, and what both installed binaries (vllm-router 0.1.17, sglang-router 0.3.2) do
  when probed (sequential requests of 8 different prefixes all land on one pod); older
  sgl-router source sent it to the worker with the smallest tree instead
  (`miss="smallest_tree"`). Not their code, and not their HTTP/tokenizer overheads beyond
  a fixed decision latency.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench.vsim.radix import ApproxTree
from bench.vsim.workload import VRequest
from epp.datalayer.datastore import Datastore
from epp.datalayer.labels import endpoint_from_labels
from epp.devstack.envoy import EnvoyOptions
from epp.requestcontrol.admission import SaturationPolicy
from epp.requestcontrol.config import build_request_control
from epp.requestcontrol.decision import Decision
from epp.requestcontrol.director import Director, DirectorSettings
from epp.requestcontrol.errors import RequestError
from epp.requestcontrol.flowcontrol.aio import DEFAULT_TICK_S
from epp.requestcontrol.flowcontrol.queue import Ticket
from epp.requestcontrol.kv_sync import PrefixIndexKVSync
from epp.requestcontrol.parse import build_request
from epp.scheduling.services import Services

# The gateway's access-log flush interval (buffer_flush_interval), in EPP seconds.
ACCESS_LOG_FLUSH_S = EnvoyOptions.access_log_flush_ms / 1000.0

if TYPE_CHECKING:
    from bench.vsim.core import Pod, Simulation


class RouteError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Pick:
    pod: Pod
    prefill: Pod | None = None


class Router:
    name = "router"
    uses_metrics = False  # the simulation scrapes engine metrics only for routers that read them
    kv_sync: PrefixIndexKVSync | None = None  # set when the router consumes KV events
    # Model seconds the router adds on the way in (decision + proxying), the way back per
    # response event. Calibrated against the real harness (bench/vsim/validate.py).
    overhead_s = 0.0005

    def setup(self, sim: Simulation) -> None:
        self.sim = sim
        self.pods = [p for p in sim.pods if p.cfg.role != "prefill"] or list(sim.pods)

    def pick(self, vr: VRequest, now: float) -> Pick | None:
        """Where `vr` goes; None: it waits in the router, which calls `sim.forward` (or
        `sim.reject`) later."""
        raise NotImplementedError

    def on_headers(self, vr: VRequest, now: float, status: int) -> None:
        """Response headers reached the router."""

    def on_first_token(self, vr: VRequest, now: float) -> None:
        """The first body chunk reached the router."""

    def on_end(self, vr: VRequest, now: float, ok: bool) -> None:
        """The response ended at the router (or failed)."""

    def stats(self) -> dict[str, Any]:
        return {}


class RoundRobin(Router):
    """Envoy's ROUND_ROBIN over every pod of the pool (what `bench.run`'s round_robin is)."""

    name = "round_robin"
    overhead_s = 0.0003

    def setup(self, sim: Simulation) -> None:
        super().setup(sim)
        self.pods = list(sim.pods)
        self.next = 0

    def pick(self, vr: VRequest, now: float) -> Pick:
        pod = self.pods[self.next % len(self.pods)]
        self.next += 1
        return Pick(pod)


class _Counting(Router):
    """Routers that count their own in-flight requests per pod until the stream ends."""

    def setup(self, sim: Simulation) -> None:
        super().setup(sim)
        self.load = {p.idx: 0 for p in self.pods}
        self.rng = random.Random(sim.seed * 31 + 7)

    def _charge(self, pod: Pod, vr: VRequest) -> Pick:
        self.load[pod.idx] += 1
        vr.decision = pod
        return Pick(pod)

    def on_end(self, vr: VRequest, now: float, ok: bool) -> None:
        pod = vr.decision
        if pod is not None:
            self.load[pod.idx] -= 1
            vr.decision = None


class LeastLoaded(_Counting):
    name = "least_loaded"

    def pick(self, vr: VRequest, now: float) -> Pick:
        load = self.load
        least = min(load[p.idx] for p in self.pods)
        ties = [p for p in self.pods if load[p.idx] == least]
        return self._charge(ties[0] if len(ties) == 1 else self.rng.choice(ties), vr)


class PowerOfTwo(_Counting):
    name = "power_of_two"

    def pick(self, vr: VRequest, now: float) -> Pick:
        if len(self.pods) == 1:
            return self._charge(self.pods[0], vr)
        a, b = self.rng.sample(self.pods, 2)
        return self._charge(a if self.load[a.idx] <= self.load[b.idx] else b, vr)


class CacheAware(_Counting):
    """RE-IMPLEMENTATION of vllm-router / sglang-router `cache_aware` (see module doc)."""

    name = "cache_aware"
    overhead_s = 0.0008

    def __init__(
        self, *, cache_threshold: float = 0.3, balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5, eviction_interval_s: float = 120.0,
        max_tree_chars: int = 32 * 1024 * 1024, name: str = "cache_aware",
        miss: str = "min_load",
    ) -> None:
        if miss not in ("min_load", "smallest_tree"):
            raise ValueError("miss must be min_load or smallest_tree")
        self.miss = miss
        self.cache_threshold = cache_threshold
        self.abs_threshold = balance_abs_threshold
        self.rel_threshold = balance_rel_threshold
        self.eviction_interval_s = eviction_interval_s
        self.max_tree_chars = max_tree_chars
        self.name = name
        self.decisions = {"cache_hit": 0, "cache_miss": 0, "load_balance": 0}

    def setup(self, sim: Simulation) -> None:
        super().setup(sim)
        self.tree = ApproxTree(random.Random(sim.seed * 131 + 5))
        # Their worker list order (registration order: arbitrary, then fixed) breaks ties.
        self.pods = list(self.pods)
        random.Random(sim.seed * 57 + 1).shuffle(self.pods)
        self.by_key = {p.key: p for p in self.pods}
        self.keys = [p.key for p in self.pods]
        for k in self.keys:
            self.tree.add_tenant(k)
        self.next_eviction = self.eviction_interval_s

    @staticmethod
    def text_of(vr: VRequest) -> str:
        # Their chat text for routing: the messages' contents in order.
        return " ".join(m.get("content", "") for m in vr.full_messages)

    def pick(self, vr: VRequest, now: float) -> Pick:
        if self.eviction_interval_s > 0 and now >= self.next_eviction:
            # Their background thread, run at the first pick after each interval.
            self.tree.evict_by_size(self.max_tree_chars)
            self.next_eviction = now + self.eviction_interval_s
        text = self.text_of(vr)
        load = self.load
        loads = [load[p.idx] for p in self.pods]
        hi, lo = max(loads), min(loads)
        if hi - lo > self.abs_threshold and hi > lo * self.rel_threshold:
            self.decisions["load_balance"] += 1
            pod = min(self.pods, key=lambda p: load[p.idx])  # first of the least loaded
            if text:
                self.tree.insert(text, pod.key, now)
            return self._charge(pod, vr)
        matched, tenant = self.tree.prefix_match(text, now)
        rate = matched / len(text) if text else 0.0
        if rate > self.cache_threshold and tenant is not None:
            self.decisions["cache_hit"] += 1
            key = tenant
        else:
            self.decisions["cache_miss"] += 1
            if self.miss == "min_load":
                key = min(self.pods, key=lambda p: load[p.idx]).key
            else:
                key = self.tree.smallest_tenant(self.keys)
        self.tree.insert(text, key, now)
        return self._charge(self.by_key[key], vr)

    def stats(self) -> dict[str, Any]:
        return {"decisions": dict(self.decisions)}


class EppRouter(Router):
    """The product's request control in process (see module doc)."""

    name = "epp"
    uses_metrics = True
    overhead_s = 0.0008

    def __init__(
        self, config_text: str | None = None, name: str = "epp", access_log: bool = False
    ) -> None:
        self.config_text = config_text
        self.name = name
        # `epp serve --response-from-access-log`: nothing after the routing answer; the
        # gateway's access-log entry brings the status and the end, one flush later.
        self.access_log = access_log
        self.errors: dict[int, int] = {}
        self.picks_with_prefill = 0
        self.queued_total = 0
        self.tick_s = DEFAULT_TICK_S
        self._ticking = False

    def setup(self, sim: Simulation) -> None:
        super().setup(sim)
        self.datastore = Datastore()
        for p in sim.pods:
            c = p.cfg
            labels = {"model": c.model, "role": c.role, "engine-type": c.engine, **c.labels}
            ep = endpoint_from_labels(c.host, c.port, f"sim-{c.host}-{c.port}", "", labels, True)
            p.endpoint = self.datastore.upsert_endpoint("vsim", ep)
        self.by_key = {p.endpoint.key: p for p in sim.pods}
        precise_wanted = "precise-prefix-cache-scorer" in (self.config_text or "")
        services = Services(tokenizers=_sim_tokenizers() if precise_wanted else None)
        rc = build_request_control(self.config_text, services=services)
        seed_plugins(rc, sim.seed)
        settings = DirectorSettings(saturation=SaturationPolicy(metrics_stale_after=1.0))
        self.director = Director(
            self.datastore, rc.scheduler, settings, hooks=rc.hooks,
            rng=random.Random(sim.seed * 17 + 3), flow_control=rc.flow_control,
        )
        self.model = sim.pods[0].cfg.model
        self.response_body = sim.response_body
        precise = services.precise
        if precise is not None or sim.kv_events:
            # What `epp serve` wires to its KV-event subscriber; the simulation delivers the
            # engines' events straight to it.
            ds = self.datastore
            if precise is not None:
                precise.capacity = lambda key: ep.metrics.num_blocks if (ep := ds.get(key)) else 0
            self.kv_sync = PrefixIndexKVSync(self.director.prefix_index, precise=precise)

    def pick(self, vr: VRequest, now: float) -> Pick | None:
        data = {
            "model": self.model,
            "messages": vr.full_messages,
            "max_tokens": vr.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"content-type": "application/json", **vr.headers}
        director = self.director
        try:
            req = build_request(f"r{vr.idx}", "chat", data, headers)
            director.apply_headers(req, headers)
            out = director.dispatch(director.admission(req))
        except RequestError as e:
            self.errors[e.status] = self.errors.get(e.status, 0) + 1
            raise RouteError(e.status, e.message) from e
        if isinstance(out, Ticket):  # flow control: the request waits in the EPP
            self.queued_total += 1
            out.on_done = lambda t, vr=vr: self._left_queue(vr, t)
            self._arm_tick()
            return None
        return self._bind(vr, out, now)

    def _bind(self, vr: VRequest, d: Decision, now: float) -> Pick:
        vr.decision = d
        res = d.result
        vr.predicted_uncached = res.uncached_tokens
        pod = self.by_key[res.target.key]
        prefill = self.by_key[res.prefill.key] if res.prefill is not None else None
        if prefill is not None:
            self.picks_with_prefill += 1
        # The protocol layer's prefill timer: the prefill is assumed done when predicted.
        ttft_s = (res.predicted_ttft_ms or 0.0) / 1000.0 / self.sim.time_scale
        self.sim.call_at(now + ttft_s, self._prefill_elapsed, d)
        if self.access_log:  # the ext_proc stream closes after the answer
            self.director.awaiting_log(d, 0.0)
        return Pick(pod, prefill)

    # ---- flow control (the asyncio waiter's job, in virtual time) ---------------------------
    def _left_queue(self, vr: VRequest, t: Ticket) -> None:
        now = self.sim.now
        if t.decision is not None and t.error is None:
            self.sim.forward(vr, self._bind(vr, t.decision, now), now)
        else:
            err = t.error
            status = err.status if isinstance(err, RequestError) else 503
            self.errors[status] = self.errors.get(status, 0) + 1
            self.sim.reject(vr, status, str(err) if err else "cancelled", now)

    def _arm_tick(self) -> None:
        if not self._ticking:
            self._ticking = True
            self.sim.call_at(self.sim.now + self.tick_s / self.sim.time_scale, self._tick)

    def _tick(self, _: object = None) -> None:
        """AsyncFlowWaiter's periodic pump: queued requests move when scraped load drops or
        their time in the queue runs out."""
        self._ticking = False
        flow = self.director.flow
        while flow is not None and flow.successor is not None:
            flow = flow.successor
        if flow is None:
            return
        flow.pump()
        if flow.queued:
            self._arm_tick()

    def _prefill_elapsed(self, d: Decision) -> None:
        self.director.prefill_elapsed(d)

    def on_headers(self, vr: VRequest, now: float, status: int) -> None:
        d = vr.decision
        if d is None or self.access_log:
            return
        self.director.response_headers(d, status)
        if not self.response_body:
            # Envoy closes the ext_proc stream after the last phase it sends: the EPP's
            # finally-block runs now, while the response is still streaming, and (as
            # epp/extproc/server.py does) defers the release to the predicted end.
            delay = self.director.stream_closed(d, 200 <= status < 300)
            if delay > 0.0:
                self.sim.call_at(now + delay / self.sim.time_scale, self._release, d)

    def _release(self, d: Any) -> None:
        self.director.release(d)

    def on_first_token(self, vr: VRequest, now: float) -> None:
        d = vr.decision
        if d is not None and self.response_body:
            self.director.first_byte(d, self.sim.epp_now(now), learn=True)

    def on_end(self, vr: VRequest, now: float, ok: bool) -> None:
        d = vr.decision
        if d is None:
            return
        if ok and self.response_body:
            self.director.complete(d, vr.output_tokens, self.sim.epp_now(now))
        if self.access_log:
            status = 200 if ok else (vr.status or 502)
            flush = ACCESS_LOG_FLUSH_S / self.sim.time_scale
            self.sim.call_at(now + flush, self._logged, (d, status))
            return
        self.director.release(d)

    def _logged(self, entry: tuple[Decision, int]) -> None:
        d, status = entry
        self.director.response_headers(d, status)
        self.director.release(d)

    def stats(self) -> dict[str, Any]:
        return {"errors": dict(self.errors), "picks_with_prefill": self.picks_with_prefill,
                "queued_in_epp": self.queued_total}


_TOKENIZERS: Any = None


def _sim_tokenizers() -> Any:
    """The simulator's tokenizer as `--tokenizer-dir` loads it (bench.run passes it to
    precise-prefix variants), loaded once per process."""
    global _TOKENIZERS
    if _TOKENIZERS is None:
        from epp.sim.tokenizer import DATA_DIR
        from epp.tokenization.tokenizer import TokenizerSet

        _TOKENIZERS = TokenizerSet.from_specs([str(DATA_DIR)])
    return _TOKENIZERS


def seed_plugins(rc: Any, seed: int) -> None:
    """Seed every plugin's own random generator (pickers break ties at random, from the OS
    unless configured), and the global one, so that a seed gives the same run."""
    random.seed(seed)
    sched = rc.scheduler
    plugins: list[Any] = [sched.handler, *rc.hooks]
    for prof in sched.profiles.values():
        plugins += [*prof.filters, *(ws.scorer for ws in prof.scorers), prof.picker]
    for i, p in enumerate(plugins):
        rng = getattr(p, "rng", None)
        if isinstance(rng, random.Random):
            rng.seed(seed * 1009 + i)


ROUTERS = ("epp", "round_robin", "least_loaded", "power_of_two", "cache_aware",
           "vllm-router:cache_aware", "sglang-router:cache_aware")


def make_router(name: str, epp_config_text: str | None = None) -> Router:
    from bench.routers import ACCESS_LOG_SUFFIX, EPP_CONFIGS

    base = name.removesuffix(ACCESS_LOG_SUFFIX)
    kind, _, variant = base.partition(":")
    if kind == "epp":
        text = epp_config_text
        if variant and variant != "default" and text is None:
            text = (EPP_CONFIGS / f"{variant}.yaml").read_text()
        return EppRouter(text, name=name, access_log=base != name)
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded()
    if name in ("power_of_two", "vllm-router:power_of_two", "sglang-router:power_of_two"):
        r = PowerOfTwo()
        r.name = name
        return r
    if name in ("cache_aware", "vllm-router:cache_aware"):
        return CacheAware(name=name)
    if name == "sglang-router:cache_aware":
        return CacheAware(eviction_interval_s=60.0, max_tree_chars=64 * 1024 * 1024, name=name)
    if name in ("vllm-router:round_robin", "sglang-router:round_robin"):
        r2 = RoundRobin()
        r2.name = name
        return r2
    raise ValueError(f"unknown router {name!r}; known: {', '.join(ROUTERS)}, epp:<variant>")

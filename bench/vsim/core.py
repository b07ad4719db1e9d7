"""The discrete-event simulation: pods running the engine model in virtual time, a router in
front of them, clients sending a schedule. No sockets, no wall clock.

Time is model seconds (what the modelled GPUs take). The engines are `epp.sim.engine.
EngineCore`, the same code the HTTP simulator steps in wall time; runs of pure-decode
steps are fused (`decode_run_limit` / `complete_run`) and cut short when a request
arrives, which is exactly what stepping one by one gives.

The EPP's clock (`epp.clock`) reads `now * time_scale` while the simulation runs: the
harness runs its pods `time_scale` times slower than the model and everything the EPP
measures (TTFT, scrape interval, staleness, prefill timers) is in those wall seconds, so
vsim shows the EPP the same numbers.

A request's path, as in `bench.run` through a router:
client send -> router pick (+overhead) -> pod: API overhead (+ KV transfer when it was
prefilled remotely) -> engine -> response headers (streaming: as the engine takes the
request) -> tokens -> end. Pods can fail (error_rate -> 500, max_waiting -> 429,
die_after_s / down_for_s -> connection errors).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from bench.vsim.routers import Pick, RouteError, Router
from bench.vsim.workload import TokenCache, VRequest
from epp import clock
from epp.datalayer.kv_events import decode_event
from epp.datalayer.metrics_scraper import apply_metrics
from epp.datalayer.prom_parse import ParsedMetrics
from epp.sim.config import SimConfig
from epp.sim.engine import EngineCore, EngineError, Request, prompt_hashes
from epp.sim.metrics import EngineStats

Event = tuple[float, int, Callable[[Any], None], Any]


class ItlHistogram:
    """Inter-token gaps as the clients see them, in log-spaced bins (0.2% wide)."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0.0
        self.n = 0

    def add(self, v: float, count: int = 1) -> None:
        if count <= 0:
            return
        b = int(math.log(max(v, 1e-6)) * 500.0)
        self.counts[b] = self.counts.get(b, 0) + count
        self.total += v * count
        self.n += count

    def percentile(self, q: float) -> float:
        if not self.n:
            return math.nan
        rank = q / 100 * (self.n - 1)
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen > rank:
                return math.exp((b + 0.5) / 500.0)
        return math.exp((max(self.counts) + 0.5) / 500.0)


class Pod:
    """One simulated model server: an engine core plus the segment of work in progress."""

    __slots__ = (
        "alive", "batch", "busy", "cfg", "core", "ctx0", "dt", "end", "endpoint", "epoch", "idx",
        "key", "n", "requests_total", "run_j", "run_seqs", "scrape_failures", "sim", "t0",
        "used0", "version",
    )

    def __init__(self, sim: Simulation, idx: int, cfg: SimConfig) -> None:
        self.sim = sim
        self.idx = idx
        self.cfg = cfg
        self.key = cfg.address
        self.core = EngineCore(cfg, EngineStats())
        self.endpoint: Any = None  # the EPP's Endpoint for this pod, when the router has one
        self.alive = True
        self.epoch = 0  # bumped when the pod dies: its old requests are gone
        self.busy = False
        self.version = 0
        self.batch: list[tuple[Request, int]] = []
        self.t0 = 0.0
        self.end = 0.0
        self.dt = 0.0
        self.run_j = 0  # >= 1: a fused decode run of run_j steps; 0: one ordinary step
        self.n = 0
        self.ctx0 = 0
        self.run_seqs: list[tuple[int, int]] = []  # (computed, blocks) per request of a run
        self.used0 = 0
        self.requests_total = 0
        self.scrape_failures = 0

    # ---- stepping -----------------------------------------------------------------------------
    def kick(self, now: float) -> None:
        """Start the next step (or fused run) if there is work and nothing in progress."""
        core = self.core
        sim = self.sim
        while True:
            if core.idle:
                self.busy = False
                return
            batch = core.schedule(now)
            if not batch:
                head = core.waiting[0] if core.waiting else None
                if core.fail_unschedulable(now) and head is not None:
                    sim.engine_failed(self, head, now)
                    continue
                self.busy = False
                return
            break
        self.batch = batch
        self.t0 = now
        limit = core.decode_run_limit(batch) if sim.fuse else 0
        if limit >= 2:
            n = len(batch)
            ctx0 = 0
            for r, _ in batch:
                ctx0 += len(r.tokens)
            self.n, self.ctx0, self.run_j = n, ctx0, limit
            self.end = now + core.run_duration(n, ctx0, limit)
            # (tokens computed, blocks held) per request at the start: the blocks the run
            # holds after k steps follow exactly (the engine allocates a step's block
            # before the step).
            self.run_seqs = [(r.num_computed, len(r.blocks)) for r, _ in batch]
            self.used0 = self.cfg.num_gpu_blocks - core.pool.num_free
        else:
            self.run_j = 0
            self.dt = core.step_time(batch)
            self.end = now + self.dt * self.cfg.slow_factor
        self.busy = True
        self.version += 1
        sim.push(self.end, self.on_segment_end, self.version)

    def steps_done_by(self, t: float) -> int:
        """In a fused run: the number of its steps that have ended by time `t`."""
        core, n, ctx0 = self.core, self.n, self.ctx0
        c = self.cfg
        a = (c.step_base_s + c.decode_per_seq_s * n + c.decode_per_ctx_token_s * ctx0)
        b = c.decode_per_ctx_token_s * n
        x = (t - self.t0) / c.slow_factor
        if x <= 0:
            return 0
        if b > 0:  # b/2 j^2 + (a - b/2) j - x = 0
            p = a - b / 2
            j = int((-p + math.sqrt(p * p + 2 * b * x)) / b)
        else:
            j = int(x / a)
        j = max(0, min(j, self.run_j))
        while j < self.run_j and self.t0 + core.run_duration(n, ctx0, j + 1) <= t:
            j += 1
        while j > 0 and self.t0 + core.run_duration(n, ctx0, j) > t:
            j -= 1
        return j

    def cut_run(self, now: float) -> None:
        """A request arrived during a fused run: stop it after the step in progress, so the
        next schedule (which may admit the newcomer) happens exactly when it would."""
        if self.run_j < 2 or len(self.core.running) >= self.cfg.max_num_seqs:
            return  # a single step, or a full batch: nothing could be admitted earlier
        j = min(self.run_j, self.steps_done_by(now) + 1)
        if j >= self.run_j:
            return
        self.run_j = j
        self.end = self.t0 + self.core.run_duration(self.n, self.ctx0, j)
        self.version += 1
        self.sim.push(self.end, self.on_segment_end, self.version)

    def on_segment_end(self, version: int) -> None:
        if version != self.version or not self.busy:
            return
        sim = self.sim
        now = self.end
        core = self.core
        if self.run_j >= 1:
            n, j = self.n, self.run_j
            c = self.cfg
            itl = sim.itl
            for i in range(j):  # every request of the run got one token per step
                itl.add((c.step_base_s + c.decode_per_seq_s * n
                         + c.decode_per_ctx_token_s * (self.ctx0 + n * i)) * c.slow_factor, n)
            for req in core.complete_run(self.batch, j, self.t0):
                sim.engine_done(self, req, now)
        else:
            got = core.complete(self.batch, now, self.dt)
            step = self.dt * self.cfg.slow_factor
            later = 0
            for req in got:
                if len(req.tokens) - req.prompt_len == 1:
                    sim.first_token(self, req, now)
                else:
                    later += 1
                if req.finished:
                    sim.engine_done(self, req, now)
            sim.itl.add(step, later)
        self.batch = []
        self.busy = False
        self.kick(now)

    # ---- what /metrics would say now ------------------------------------------------------------
    def scrape(self, now: float) -> ParsedMetrics:
        core = self.core
        c = self.cfg
        used = c.num_gpu_blocks - core.pool.num_free
        tpot_sum = core.stats.itl.total
        tpot_count = core.stats.itl.n
        if self.busy and self.run_j >= 2:
            j = self.steps_done_by(now)
            k = min(j + 1, self.run_j)  # the step in progress has its blocks already
            bs = c.block_size
            used = self.used0 + sum(
                max(0, -(-(computed + k) // bs) - held) for computed, held in self.run_seqs
            )
            tpot_count += self.n * j
            tpot_sum += self.n * core.run_duration(self.n, self.ctx0, j)
        scale = self.sim.time_scale
        return ParsedMetrics({
            "waiting": float(len(core.waiting)),
            "running": float(len(core.running)),
            "kv_usage": min(1.0, used / c.num_gpu_blocks),
            "block_size": c.block_size,
            "num_blocks": c.num_gpu_blocks,
            "tpot_sum": tpot_sum * scale,
            "tpot_count": float(tpot_count),
        })


class Simulation:
    def __init__(
        self,
        pool: Sequence[SimConfig],
        router: Router,
        requests: list[VRequest],
        *,
        time_scale: float = 1.0,
        seed: int = 1,
        scrape_interval: float = 0.05,
        response_body: bool = False,
        fuse: bool = True,
        send_deadline: float = math.inf,
        pd_sidecar: bool = False,
        kv_events: bool = False,
        kv_event_delay_s: float = 0.0005,
        audit: bool = False,
    ) -> None:
        self.seed = seed
        self.time_scale = time_scale
        self.scrape_interval = scrape_interval  # EPP seconds (wall, in the harness)
        self.response_body = response_body
        self.fuse = fuse
        self.send_deadline = send_deadline
        self.pd_sidecar = pd_sidecar
        self.kv_events = kv_events  # also on when the router's config needs them
        self.kv_event_delay_s = kv_event_delay_s
        self.kv_events_delivered = 0
        self.audit = audit
        self.now = 0.0
        self.heap: list[Event] = []
        self._seq = itertools.count()
        self.pods = [Pod(self, i, cfg.replace()) for i, cfg in enumerate(pool)]
        self.requests = requests
        self.router = router
        self.tokens = TokenCache(pool[0].block_size if pool else 16)
        self.itl = ItlHistogram()
        self.rng = random.Random(seed * 1_000_003 + 11)
        self.by_engine_req: dict[int, tuple[VRequest, bool]] = {}  # rid -> (request, is prefill hop)
        self.histories: dict[str, list[dict[str, str]]] = {}
        self.session_queue: dict[str, list[VRequest]] = {}
        self.session_busy: set[str] = set()
        self.events = 0
        self.last_skipped = 0.0
        self.pending = 0

    # ---- event queue --------------------------------------------------------------------------
    def push(self, t: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        heapq.heappush(self.heap, (t, next(self._seq), fn, arg))

    def call_at(self, t: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        self.push(t, fn, arg)

    def epp_now(self, t: float | None = None) -> float:
        return (self.now if t is None else t) * self.time_scale

    def run(self) -> None:
        router = self.router
        scale = self.time_scale
        clock.set_clock(lambda: self.now * scale)
        try:
            router.setup(self)
            if router.uses_metrics:
                self._start_scrapes()
            if router.kv_sync is not None:
                for p in self.pods:
                    self._publish_to(p)
                    router.kv_sync.on_stream(p.key, 0)
            for p in self.pods:
                c = p.cfg
                if c.die_after_s > 0:
                    self.push(c.die_after_s, self._die, p)
            for vr in self.requests:
                if vr.session:
                    self.session_queue.setdefault(vr.session, []).append(vr)
                else:
                    self.push(vr.at, self._send, vr)
            for q in self.session_queue.values():
                self.push(q[0].at, self._send_session, q[0].session)
            heap = self.heap
            pop = heapq.heappop
            n = 0
            self.pending = len(self.requests)
            while heap and self.pending > 0:
                t, _, fn, arg = pop(heap)
                self.now = t
                fn(arg)
                n += 1
            self.events = n
        finally:
            clock.set_clock(None)

    # ---- KV events (the engines' publishers -> the EPP's subscriber, in virtual time) ---------
    def _publish_to(self, pod: Pod) -> None:
        """Give `pod`'s engine a publisher: its event batches reach the router's KV sync
        `kv_event_delay_s` later, in order."""
        key = pod.key

        def publish(events: list[list[object]]) -> None:
            self.push(self.now + self.kv_event_delay_s, self._deliver_kv, (key, events))

        pod.core.publish_events(publish)

    def _deliver_kv(self, arg: tuple[str, list[list[object]]]) -> None:
        key, events = arg
        sync = self.router.kv_sync
        if sync is None:
            return
        for raw in events:
            ev = decode_event(raw)
            if ev is not None:
                self.kv_events_delivered += 1
                sync.on_event(key, ev)

    # ---- metrics scraping (the EPP's MetricsScraper, in virtual time) -------------------------
    def _start_scrapes(self) -> None:
        interval = self.scrape_interval / self.time_scale
        for p in self.pods:
            self.push(self.rng.uniform(0.0, interval), self._scrape, p)

    def _scrape(self, pod: Pod) -> None:
        interval = self.scrape_interval / self.time_scale
        ep = pod.endpoint
        if not pod.alive:  # MetricsScraper.scrape_once on a connection refused
            health = getattr(ep, "health", None)
            if health is not None and health.unreachable_until != math.inf:
                health.unreachable_until = math.inf
                health.connect_failures += 1
            pod.scrape_failures += 1
            ep.metrics.scrape_errors += 1
            delay = min(2.0, self.scrape_interval * 2.0 ** min(pod.scrape_failures, 20))
            delay *= self.rng.uniform(0.8, 1.0)
            self.push(self.now + delay / self.time_scale, self._scrape, pod)
            return
        pod.scrape_failures = 0
        health = getattr(ep, "health", None)
        if health is not None:
            health.unreachable_until = 0.0
        apply_metrics(ep.metrics, pod.scrape(self.now), self.now * self.time_scale)
        self.push(self.now + interval, self._scrape, pod)

    # ---- clients --------------------------------------------------------------------------------
    def _send_session(self, session: str) -> None:
        q = self.session_queue[session]
        vr = q.pop(0)
        history = self.histories.setdefault(session, [])
        vr.full_messages = [*history, *vr.messages]
        self.session_busy.add(session)
        self._send(vr)

    def _session_next(self, vr: VRequest) -> None:
        s = vr.session
        if vr.ok:
            self.histories[s].extend(
                [*vr.messages, {"role": "assistant", "content": vr.reply}]
            )
        q = self.session_queue.get(s)
        if q:
            self.push(max(q[0].at, self.now), self._send_session, s)

    def _send(self, vr: VRequest) -> None:
        now = self.now
        if now > self.send_deadline:  # the harness's phase bound: not sent at all
            self.pending -= 1
            self.last_skipped = now  # the harness's phase still lasts until then
            if vr.session:
                self._drop_session(vr.session)
            return
        if not vr.full_messages:
            vr.full_messages = vr.messages
        vr.sent = now
        vr.prompt_ids = self.tokens.prompt(vr.full_messages)
        try:
            pick = self.router.pick(vr, now)
        except RouteError as e:
            self._fail(vr, e.status, str(e), now + self.router.overhead_s, router_end=False)
            return
        if pick is not None:
            self.forward(vr, pick, now)

    def forward(self, vr: VRequest, pick: Pick, now: float) -> None:
        """The router decided: the request travels to its pod (or its prefill pod first)."""
        arrive = now + self.router.overhead_s
        vr.server = pick.pod.key
        if self.audit:
            self._audit(vr, pick.pod)
        if pick.prefill is not None and self.pd_sidecar:
            self.push(arrive, self._at_pod, (vr, pick.prefill, True, pick.pod))
        else:
            self.push(arrive, self._at_pod, (vr, pick.pod, False, None))

    def _audit(self, vr: VRequest, chosen: Pod) -> None:
        """What the engines' caches held for this prompt when the router chose: the chosen
        pod's cached blocks and the best any serving pod had (an oracle's view; costs a
        cache lookup per pod per request)."""
        bs = chosen.cfg.block_size
        hashes = prompt_hashes(vr.prompt_ids, bs)
        best = 0
        got = 0
        for p in self.pods:
            if p.cfg.role == "prefill" or not p.alive:
                continue
            n = len(p.core.pool.lookup_prefix(hashes))
            best = max(best, n)
            if p is chosen:
                got = n
        vr.audit = (got * bs, best * bs)

    def reject(self, vr: VRequest, status: int, error: str, now: float) -> None:
        """The router gave up on a request it had held (e.g. flow control's 429)."""
        self._fail(vr, status, error, now + self.router.overhead_s, router_end=False)

    def _drop_session(self, session: str) -> None:
        q = self.session_queue.pop(session, [])
        self.pending -= len(q)

    # ---- pods -------------------------------------------------------------------------------------
    def _at_pod(self, arg: tuple[VRequest, Pod, bool, Pod | None]) -> None:
        vr, pod, prefill_hop, decode_pod = arg
        now = self.now
        if not pod.alive:
            self._fail(vr, 503, "upstream connect error", now + self.router.overhead_s)
            return
        pod.requests_total += 1
        c = pod.cfg
        if c.error_rate > 0 and self.rng.random() < c.error_rate:
            self._fail(vr, 500, "injected failure", now + self.router.overhead_s)
            return
        delay = c.api_overhead_s
        if vr.remote_kv and not prefill_hop:
            delay += pod.core.kv_transfer_s(vr.prompt_ids)
        self.push(now + delay, self._admit, (vr, pod, prefill_hop, decode_pod, pod.epoch, now))

    def _admit(self, arg: tuple[VRequest, Pod, bool, Pod | None, int, float]) -> None:
        vr, pod, prefill_hop, decode_pod, epoch, arrived = arg
        now = self.now
        if not pod.alive or epoch != pod.epoch:
            self._fail(vr, 503, "upstream reset", now + self.router.overhead_s)
            return
        core = pod.core
        if core.queue_full():
            self._fail(vr, 429, "waiting queue is full", now + self.router.overhead_s)
            return
        req = Request(
            prompt_ids=vr.prompt_ids,
            max_tokens=1 if prefill_hop else vr.max_tokens,
            seed=len(vr.prompt_ids) + (vr.prompt_ids[-1] if vr.prompt_ids else 0),
            remote_prefilled=vr.remote_kv and not prefill_hop,
            arrival=arrived,
        )
        if pod.cfg.block_size == self.tokens.block_size:
            req.hashes = list(self.tokens.leading_hashes(vr.full_messages))
        try:
            core.add(req)
        except EngineError as e:
            self._fail(vr, 400, str(e), now + self.router.overhead_s)
            return
        self.by_engine_req[req.rid] = (vr, prefill_hop)
        if not prefill_hop:
            vr.engine_req = req
            vr.pod = pod
            # A stream's response headers leave as the engine takes the request.
            self.push(now + self.router.overhead_s, self._headers, vr)
        else:
            vr.pod = decode_pod
        if pod.busy:
            pod.cut_run(now)
        else:
            pod.kick(now)

    def _headers(self, vr: VRequest) -> None:
        if vr.status == 0:
            vr.status = 200
        self.router.on_headers(vr, self.now, 200)

    # ---- engine callbacks -------------------------------------------------------------------------
    def first_token(self, pod: Pod, req: Request, now: float) -> None:
        vr, prefill_hop = self.by_engine_req.get(req.rid, (None, False))
        if vr is None or prefill_hop:
            return
        back = self.router.overhead_s
        vr.first_token = now + back
        self.push(now + back, self._router_first, vr)

    def _router_first(self, vr: VRequest) -> None:
        self.router.on_first_token(vr, self.now)

    def engine_done(self, pod: Pod, req: Request, now: float) -> None:
        entry = self.by_engine_req.pop(req.rid, None)
        if entry is None:
            return
        vr, prefill_hop = entry
        if prefill_hop:
            # The decode pod's sidecar got the prefill answer: send the request there.
            vr.remote_kv = True
            self.push(now + self.router.overhead_s, self._at_pod, (vr, vr.pod, False, None))
            return
        back = self.router.overhead_s
        vr.output_tokens = req.num_output
        vr.cached_tokens = req.num_cached
        if vr.session:
            vr.reply = "".join(req.output_text)
        vr.end = now + back
        self.push(now + back, self._complete, vr)

    def engine_failed(self, pod: Pod, req: Request, now: float) -> None:
        entry = self.by_engine_req.pop(req.rid, None)
        if entry is not None:
            self._fail(entry[0], 503, req.error or "engine error", now + self.router.overhead_s)

    def _complete(self, vr: VRequest) -> None:
        self.router.on_end(vr, self.now, True)
        self._finished(vr)

    def _fail(self, vr: VRequest, status: int, error: str, at: float,
              router_end: bool = True) -> None:
        vr.status = status if vr.status in (0, 200) and status != 200 else vr.status
        vr.error = error or "error"
        vr.end = at
        self.push(at, self._failed_at_client, (vr, router_end))

    def _failed_at_client(self, arg: tuple[VRequest, bool]) -> None:
        vr, router_end = arg
        if router_end:
            if vr.engine_req is None:  # the error came instead of a response's headers
                self.router.on_headers(vr, self.now, vr.status)
            self.router.on_end(vr, self.now, False)
        self._finished(vr)

    def _finished(self, vr: VRequest) -> None:
        self.pending -= 1
        if vr.session:
            self.session_busy.discard(vr.session)
            self._session_next(vr)

    # ---- failure injection ---------------------------------------------------------------------------
    def _die(self, pod: Pod) -> None:
        now = self.now
        pod.alive = False
        pod.epoch += 1
        pod.version += 1  # the segment in progress never ends
        pod.busy = False
        core = pod.core
        victims = [*core.waiting, *core.running]
        core.fail_all(now, "server stopped")
        for req in victims:
            entry = self.by_engine_req.pop(req.rid, None)
            if entry is not None:
                self._fail(entry[0], 502, "connection reset", now + self.router.overhead_s)
        if pod.cfg.down_for_s > 0:
            self.push(now + pod.cfg.down_for_s, self._revive, pod)

    def _revive(self, pod: Pod) -> None:
        pod.core = EngineCore(pod.cfg, EngineStats())
        pod.alive = True
        pod.busy = False
        sync = self.router.kv_sync
        if sync is not None:  # a restarted engine: a new publisher, sequence from 0
            self._publish_to(pod)
            sync.on_gap(pod.key, -1)
            sync.on_stream(pod.key, 0)

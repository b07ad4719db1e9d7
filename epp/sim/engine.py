"""The engine model: continuous batching over a paged, prefix-cached KV cache.

`EngineCore` is the whole cost model as plain synchronous code over times its driver
passes in: scheduling, step time, token delivery, preemption, prefix caching. Two drivers
share it, so they cannot drift:

* `Engine` (below): one asyncio task per simulated server running steps back to back in
  wall-clock time (`epp.sim`, the HTTP servers);
* `bench.vsim`: a discrete-event simulation in virtual time, which also fuses runs of
  pure-decode steps (`decode_run_limit` / `run_duration` / `complete_run`, exactly
  equivalent to stepping one by one).

Each step schedules running requests first (decodes take one token, unfinished prefills
take a chunk), then admits waiting requests FCFS while `max_num_seqs` and the token budget
(`max_num_batched_tokens`) allow, preempting the newest running request when a decode
cannot get a KV block. The step lasts a time computed from the work it does, then every
request that finished its prompt (or its previous token) gets one new token.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from epp.sim.config import SimConfig
from epp.sim.kvcache import ROOT_HASH, Block, BlockPool, chain_hash
from epp.sim.metrics import EngineStats
from epp.sim.tokenizer import output_piece, piece_id

_ids = itertools.count(1)
_piece_ids: dict[str, int] = {}

Batch = list[tuple["Request", int]]


def _output_token(seed: int, index: int) -> tuple[str, int]:
    piece = output_piece(seed, index)
    tid = _piece_ids.get(piece)
    if tid is None:
        tid = _piece_ids[piece] = piece_id(piece)
    return piece, tid


class EngineError(Exception):
    """A request the engine cannot serve (e.g. longer than the whole KV cache)."""


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    max_tokens: int
    seed: int = 0
    remote_prefilled: bool = False  # prompt KV arrived from a prefill pod
    rid: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    # --- engine state
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached: int = 0  # prompt tokens served from the prefix cache (or remote KV)
    blocks: list[Block] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # chained hashes of full blocks
    num_committed: int = 0  # blocks already committed to the prefix cache
    looked_up: bool = False
    running: bool = False  # in the engine's running list
    output_text: list[str] = field(default_factory=list)
    scheduled_at: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    finished: bool = False
    error: str | None = None
    _event: asyncio.Event | None = None  # wall-clock driver only
    _delivered: int = 0

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output(self) -> int:
        return len(self.tokens) - len(self.prompt_ids)

    def block_hash(self, index: int, block_size: int) -> int:
        hashes = self.hashes
        while len(hashes) <= index:
            j = len(hashes)
            parent = hashes[j - 1] if j else ROOT_HASH
            hashes.append(chain_hash(parent, self.tokens[j * block_size : (j + 1) * block_size]))
        return hashes[index]

    async def next_tokens(self) -> list[str]:
        """Wait for new output; [] when the request is finished and fully delivered."""
        while True:
            if self._delivered < len(self.output_text):
                out = self.output_text[self._delivered :]
                self._delivered = len(self.output_text)
                return out
            if self.finished:
                return []
            if self._event is None:
                self._event = asyncio.Event()
            self._event.clear()
            await self._event.wait()


class EngineCore:
    """The engine model, clock-agnostic: every method that needs a time takes `now`."""

    def __init__(
        self,
        cfg: SimConfig,
        stats: EngineStats,
        on_events: Callable[[list[list[object]]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.stats = stats
        self.pool = BlockPool(
            cfg.num_gpu_blocks, cfg.block_size, cfg.enable_prefix_caching,
            record_events=on_events is not None,
        )
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._on_events = on_events
        self.steps = 0
        self.fused_runs = 0  # complete_run calls (virtual-time driver)
        self.busy_time = 0.0  # model seconds spent in steps (before slow_factor)
        self.max_len = min(cfg.max_model_len, cfg.num_gpu_blocks * cfg.block_size)

    def publish_events(self, on_events: Callable[[list[list[object]]], None] | None) -> None:
        """Send KV events (vLLM's tagged arrays, one batch per step) to `on_events` from now
        on; None stops recording them."""
        self._on_events = on_events
        self.pool.record_events = on_events is not None

    # ------------------------------------------------------------------ requests
    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Raise EngineError if a request of this shape can never run here."""
        if prompt_len + max_tokens > self.max_len:
            raise EngineError(
                f"prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds {self.max_len}"
            )
        if prompt_len == 0:
            raise EngineError("empty prompt")

    def queue_full(self) -> bool:
        """The `max_waiting` failure injection: new requests get 429."""
        return bool(self.cfg.max_waiting) and len(self.waiting) >= self.cfg.max_waiting

    def kv_transfer_s(self, prompt_ids: Sequence[int]) -> float:
        """Model seconds to pull a remotely prefilled prompt's KV, minus what is cached here."""
        c = self.cfg
        local = self.pool.lookup_prefix(prompt_hashes(prompt_ids, c.block_size))
        remote_tokens = max(0, len(prompt_ids) - len(local) * c.block_size)
        return c.kv_transfer_latency_s + remote_tokens * c.kv_bytes_per_token / (
            c.kv_transfer_gbps * 1e9
        )

    def add(self, req: Request) -> None:
        self.check(req.prompt_len, req.max_tokens)
        self.waiting.append(req)

    def abort(self, req: Request, now: float) -> None:
        if req.finished:
            return
        if req.running:
            self.running.remove(req)
            req.running = False
        elif req in self.waiting:
            self.waiting.remove(req)
        self._finish(req, now, error="aborted")

    def reset_cache(self) -> bool:
        """Clear the prefix cache; refused while requests hold blocks."""
        if self.waiting or self.running:
            return False
        self.pool.reset()
        self._flush_events()
        return True

    def fail_all(self, now: float, error: str) -> None:
        for r in [*self.waiting, *self.running]:
            r.running = False
            self._finish(r, now, error=error)
        self.waiting.clear()
        self.running.clear()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # ------------------------------------------------------------------ one step
    def step_time(self, batch: Batch) -> float:
        """Model seconds of one step on the reference hardware (before `slow_factor`)."""
        c = self.cfg
        prefill = 0
        decodes = 0
        ctx = 0
        for req, n in batch:
            if req.num_computed >= req.prompt_len:
                decodes += 1
                ctx += len(req.tokens)
            else:
                prefill += n
        return (
            c.step_base_s
            + c.prefill_per_token_s * prefill
            + c.decode_per_seq_s * decodes
            + c.decode_per_ctx_token_s * ctx
        )

    def _blocks_needed(self, req: Request, n: int) -> int:
        bs = self.cfg.block_size
        return -(-(req.num_computed + n) // bs) - len(req.blocks)

    def schedule(self, now: float) -> Batch:
        """Pick the next step's work: running requests first, then waiting ones FCFS."""
        budget = self.cfg.max_num_batched_tokens
        batch: Batch = []
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = min(len(req.tokens) - req.num_computed, budget)
            need = self._blocks_needed(req, n)
            while need > 0:
                new = self.pool.allocate(need)
                if new is not None:
                    req.blocks.extend(new)
                    break
                victim = running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            if not req.running:
                continue  # preempted itself; the list shrank
            batch.append((req, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            hit: list[Block] = []
            if not req.blocks:
                hit = self._lookup(req)
                self.pool.touch(hit)
                req.blocks = list(hit)
                req.num_committed = len(hit)
                req.num_computed = len(hit) * self.cfg.block_size
                if req.remote_prefilled:
                    req.num_computed = max(req.num_computed, req.prompt_len - 1)
            n = min(len(req.tokens) - req.num_computed, budget)
            new = self.pool.allocate(self._blocks_needed(req, n))
            if new is None:
                self.pool.free(req.blocks)
                req.blocks = []
                req.num_computed = 0
                req.num_committed = 0
                break
            req.blocks.extend(new)
            if not req.looked_up:
                req.looked_up = True
                req.num_cached = min(req.num_computed, req.prompt_len)
                self.stats.prefix_queries += req.prompt_len
                self.stats.prefix_hits += len(hit) * self.cfg.block_size
                req.scheduled_at = now
                self.stats.observe_queue(now - req.arrival)
            self.waiting.popleft()
            running.append(req)
            req.running = True
            batch.append((req, n))
            budget -= n
        return batch

    def fail_unschedulable(self, now: float) -> bool:
        """Nothing fits (KV exhausted by the waiting head): fail that request."""
        if not self.running and self.waiting:
            self._finish(self.waiting.popleft(), now, error="request does not fit in KV cache")
            return True
        return False

    def _lookup(self, req: Request) -> list[Block]:
        bs = self.cfg.block_size
        full = req.prompt_len // bs
        hashes = [req.block_hash(j, bs) for j in range(full)]
        hit = self.pool.lookup_prefix(hashes)
        if len(hit) * bs >= req.prompt_len:  # the last prompt token is always computed
            hit = hit[:-1]
        return hit

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        req.running = False
        self.pool.free(req.blocks)
        req.blocks = []
        req.num_computed = 0
        req.num_committed = 0
        self.waiting.appendleft(req)
        self.stats.preemptions += 1

    def _commit(self, req: Request) -> None:
        bs = self.cfg.block_size
        full = req.num_computed // bs
        pool = self.pool
        events = pool.record_events
        while req.num_committed < full:
            j = req.num_committed
            h = req.block_hash(j, bs)
            parent = req.hashes[j - 1] if j else None
            pool.commit(
                req.blocks[j], h, parent, req.tokens[j * bs : (j + 1) * bs] if events else None
            )
            req.num_committed += 1

    def complete(self, batch: Batch, now: float, dt: float = 0.0) -> list[Request]:
        """The step ended at `now`: apply it. Returns the requests that got a token."""
        self.steps += 1
        self.busy_time += dt
        stats = self.stats
        out: list[Request] = []
        for req, n in batch:
            if req.finished or not req.running:
                continue
            req.num_computed += n
            self._commit(req)
            if req.num_computed < len(req.tokens):
                continue  # prefill chunk, no token yet
            piece, tid = _output_token(req.seed, len(req.tokens) - req.prompt_len)
            req.tokens.append(tid)
            req.output_text.append(piece)
            stats.generation_tokens += 1
            if req.first_token_at == 0.0:
                req.first_token_at = now
                stats.observe_ttft(now - req.arrival)
                if req.scheduled_at > 0.0:
                    stats.observe_prefill(now - req.scheduled_at)
                stats.prompt_tokens += req.prompt_len
            else:
                stats.observe_itl(now - req.last_token_at)
            req.last_token_at = now
            if len(req.tokens) - req.prompt_len >= req.max_tokens:
                self.running.remove(req)
                req.running = False
                self._finish(req, now)
            out.append(req)
        self._flush_events()
        return out

    # ------------------------------------------------------------------ fused decode runs
    def decode_run_limit(self, batch: Batch) -> int:
        """How many steps, starting with `batch` (just scheduled), run with exactly this
        batch if no request arrives: 0 or 1 unless every running request is decoding,
        nothing waiting can be admitted, and KV blocks cannot run out. The run ends with
        the step in which the first request finishes."""
        c = self.cfg
        running = self.running
        n = len(batch)
        if n == 0 or n != len(running) or n > c.max_num_batched_tokens:
            return 0
        if self.waiting and n < c.max_num_seqs:
            return 0
        k = 1 << 30
        for req, _ in batch:
            if req.num_computed < req.prompt_len or req.first_token_at == 0.0:
                return 0
            left = req.max_tokens - (len(req.tokens) - req.prompt_len)
            if left < k:
                k = left
        # Blocks the later steps may need: at most one per request per block_size steps.
        free = self.pool.num_free
        bs = c.block_size
        if n * ((k - 1) // bs + 1) > free:
            k = min(k, (free // n) * bs)  # conservative: never preempt inside a run
        return max(k, 0)

    def run_duration(self, n: int, ctx0: int, j: int) -> float:
        """Model seconds (with `slow_factor`) of `j` pure-decode steps of `n` requests whose
        contexts sum to `ctx0` at the first step: step i costs base + per_seq*n +
        per_ctx*(ctx0 + n*i), the same formula as `step_time`."""
        c = self.cfg
        per_step = c.step_base_s + c.decode_per_seq_s * n + c.decode_per_ctx_token_s * ctx0
        return (per_step * j + c.decode_per_ctx_token_s * n * (j * (j - 1) // 2)) * c.slow_factor

    def complete_run(self, batch: Batch, j: int, t0: float) -> list[Request]:
        """Apply `j` pure-decode steps of `batch` that started at `t0`; the first was
        scheduled by `schedule`, the next ones allocate their blocks here. Equivalent to
        `complete`, `schedule` and `complete` again j-1 times. Returns finished requests."""
        c = self.cfg
        n = len(batch)
        ctx0 = 0
        for req, _ in batch:
            ctx0 += len(req.tokens)
        sf = c.slow_factor
        per_step = (c.step_base_s + c.decode_per_seq_s * n + c.decode_per_ctx_token_s * ctx0)
        grow = c.decode_per_ctx_token_s * n
        itl = self.stats.itl
        t = t0
        first_end = t0 + per_step * sf
        for i in range(j):
            dt = (per_step + grow * i) * sf
            t += dt
            if i:
                itl.observe(dt, n)
        end = t
        self.steps += j
        self.fused_runs += 1
        self.busy_time += per_step * j + grow * (j * (j - 1) // 2)
        self.stats.generation_tokens += n * j
        bs = c.block_size
        done: list[Request] = []
        for req, _ in batch:
            itl.observe(first_end - req.last_token_at)
            base = len(req.tokens) - req.prompt_len
            for k in range(base, base + j):
                piece, tid = _output_token(req.seed, k)
                req.tokens.append(tid)
                req.output_text.append(piece)
            req.num_computed += j
            need = -(-req.num_computed // bs) - len(req.blocks)
            if need > 0:
                new = self.pool.allocate(need)
                if new is None:  # decode_run_limit guarantees this cannot happen
                    raise RuntimeError("KV blocks ran out inside a fused decode run")
                req.blocks.extend(new)
            self._commit(req)
            req.last_token_at = end
            if len(req.tokens) - req.prompt_len >= req.max_tokens:
                done.append(req)
        for req in done:
            self.running.remove(req)
            req.running = False
            self._finish(req, end)
        self._flush_events()
        return done

    # ------------------------------------------------------------------ end of a request
    def _finish(self, req: Request, now: float, error: str | None = None) -> None:
        if req.finished:
            return
        req.finished = True
        req.error = error
        if req.blocks:
            self.pool.free(req.blocks)
            req.blocks = []
        if error is None:
            self.stats.observe_e2e(now - req.arrival)
            self.stats.requests_ok += 1
        self._on_finish(req)

    def _on_finish(self, req: Request) -> None:
        """Hook for drivers (the wall-clock one wakes the request's reader)."""

    def _flush_events(self) -> None:
        if self.pool.events:
            events, self.pool.events = self.pool.events, []
            if self._on_events is not None:
                self._on_events(events)


class Engine(EngineCore):
    """The wall-clock driver: one asyncio task stepping the core back to back."""

    def __init__(
        self,
        cfg: SimConfig,
        stats: EngineStats,
        on_events: Callable[[list[list[object]]], None] | None = None,
    ) -> None:
        super().__init__(cfg, stats, on_events)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"engine-{self.cfg.address}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.fail_all(time.monotonic(), "server stopped")

    def add(self, req: Request) -> None:
        super().add(req)
        self._wake.set()

    def abort(self, req: Request, now: float | None = None) -> None:
        super().abort(req, time.monotonic() if now is None else now)

    def _on_finish(self, req: Request) -> None:
        if req._event is not None:
            req._event.set()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        scale = self.cfg.time_scale * self.cfg.slow_factor
        prev_end = loop.time()
        while True:
            if self.idle:
                self._wake.clear()
                await self._wake.wait()
                prev_end = loop.time()
                continue
            batch = self.schedule(time.monotonic())
            if not batch:
                self.fail_unschedulable(time.monotonic())
                await asyncio.sleep(0)
                continue
            dt = self.step_time(batch)
            now = loop.time()
            # Keep the model clock: start where the last step ended unless we fell far behind.
            start = prev_end if now - prev_end < 0.05 * scale else now
            prev_end = start + dt * scale
            delay = prev_end - now
            if delay > 0:
                await asyncio.sleep(delay)
            for req in self.complete(batch, time.monotonic(), dt):
                if req._event is not None:
                    req._event.set()


def prompt_hashes(ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of `ids` (the engine's prefix-cache keys)."""
    out: list[int] = []
    parent = ROOT_HASH
    for j in range(len(ids) // block_size):
        parent = chain_hash(parent, ids[j * block_size : (j + 1) * block_size])
        out.append(parent)
    return out

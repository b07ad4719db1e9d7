"""The engine model: continuous batching over a paged, prefix-cached KV cache.

One asyncio task per simulated server runs engine steps back to back. Each step
schedules running requests first (decodes take one token, unfinished prefills take a
chunk), then admits waiting requests FCFS while `max_num_seqs` and the token budget
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
from collections.abc import Callable
from dataclasses import dataclass, field

from epp.sim.config import SimConfig
from epp.sim.kvcache import ROOT_HASH, Block, BlockPool, chain_hash
from epp.sim.metrics import EngineStats
from epp.sim.tokenizer import output_piece, piece_id

_ids = itertools.count(1)


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
    output_text: list[str] = field(default_factory=list)
    scheduled_at: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    finished: bool = False
    error: str | None = None
    _event: asyncio.Event = field(default_factory=asyncio.Event)
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
        while len(self.hashes) <= index:
            j = len(self.hashes)
            parent = self.hashes[j - 1] if j else ROOT_HASH
            block = self.tokens[j * block_size : (j + 1) * block_size]
            self.hashes.append(chain_hash(parent, block))
        return self.hashes[index]

    async def next_tokens(self) -> list[str]:
        """Wait for new output; [] when the request is finished and fully delivered."""
        while True:
            if self._delivered < len(self.output_text):
                out = self.output_text[self._delivered :]
                self._delivered = len(self.output_text)
                return out
            if self.finished:
                return []
            self._event.clear()
            await self._event.wait()


class Engine:
    def __init__(
        self,
        cfg: SimConfig,
        stats: EngineStats,
        on_events: Callable[[list[list[object]]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.stats = stats
        self.pool = BlockPool(cfg.num_gpu_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._on_events = on_events
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.steps = 0
        self.busy_time = 0.0  # model seconds spent in steps

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"engine-{self.cfg.address}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for r in [*self.waiting, *self.running]:
            self._finish(r, error="server stopped")
        self.waiting.clear()
        self.running.clear()

    def reset_cache(self) -> bool:
        """Clear the prefix cache; refused while requests hold blocks."""
        if self.waiting or self.running:
            return False
        self.pool.reset()
        self._flush_events()
        return True

    # ------------------------------------------------------------------ requests
    def add(self, req: Request) -> None:
        max_len = min(self.cfg.max_model_len, self.cfg.num_gpu_blocks * self.cfg.block_size)
        if req.prompt_len + req.max_tokens > max_len:
            raise EngineError(
                f"prompt ({req.prompt_len}) + max_tokens ({req.max_tokens}) exceeds {max_len}"
            )
        if req.prompt_len == 0:
            raise EngineError("empty prompt")
        self.waiting.append(req)
        self._wake.set()

    def abort(self, req: Request) -> None:
        if req.finished:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._finish(req, error="aborted")

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ------------------------------------------------------------------ step loop
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        scale = self.cfg.time_scale * self.cfg.slow_factor
        prev_end = loop.time()
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
                prev_end = loop.time()
                continue
            batch = self._schedule()
            if not batch:
                # Nothing fits (KV exhausted by waiting heads): fail the head request.
                if not self.running and self.waiting:
                    self._finish(self.waiting.popleft(), error="request does not fit in KV cache")
                await asyncio.sleep(0)
                continue
            dt = self.step_time(batch)
            self.busy_time += dt
            now = loop.time()
            # Keep the model clock: start where the last step ended unless we fell far behind.
            start = prev_end if now - prev_end < 0.05 * scale else now
            prev_end = start + dt * scale
            delay = prev_end - now
            if delay > 0:
                await asyncio.sleep(delay)
            self._complete(batch)
            self.steps += 1

    def step_time(self, batch: list[tuple[Request, int]]) -> float:
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

    def _schedule(self) -> list[tuple[Request, int]]:
        budget = self.cfg.max_num_batched_tokens
        batch: list[tuple[Request, int]] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(len(req.tokens) - req.num_computed, budget)
            need = self._blocks_needed(req, n)
            while need > 0:
                new = self.pool.allocate(need)
                if new is not None:
                    req.blocks.extend(new)
                    break
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            if req.finished or req not in self.running:
                continue  # preempted itself; the list shrank
            batch.append((req, n))
            budget -= n
            i += 1
        now = time.monotonic()
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
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
            self.running.append(req)
            batch.append((req, n))
            budget -= n
        return batch

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
        self.pool.free(req.blocks)
        req.blocks = []
        req.num_computed = 0
        req.num_committed = 0
        self.waiting.appendleft(req)
        self.stats.preemptions += 1

    def _complete(self, batch: list[tuple[Request, int]]) -> None:
        bs = self.cfg.block_size
        now = time.monotonic()
        for req, n in batch:
            if req.finished or req not in self.running:
                continue
            req.num_computed += n
            full = req.num_computed // bs
            while req.num_committed < full:
                j = req.num_committed
                h = req.block_hash(j, bs)
                parent = req.hashes[j - 1] if j else None
                self.pool.commit(req.blocks[j], h, parent, req.tokens[j * bs : (j + 1) * bs])
                req.num_committed += 1
            if req.num_computed < len(req.tokens):
                continue  # prefill chunk, no token yet
            piece = output_piece(req.seed, req.num_output)
            req.tokens.append(piece_id(piece))
            req.output_text.append(piece)
            self.stats.generation_tokens += 1
            if req.first_token_at == 0.0:
                req.first_token_at = now
                self.stats.observe_ttft(now - req.arrival)
                self.stats.prompt_tokens += req.prompt_len
            else:
                self.stats.observe_itl(now - req.last_token_at)
            req.last_token_at = now
            if req.num_output >= req.max_tokens:
                self.running.remove(req)
                self._finish(req)
            else:
                req._event.set()
        self._flush_events()

    def _finish(self, req: Request, error: str | None = None) -> None:
        if req.finished:
            return
        req.finished = True
        req.error = error
        if req.blocks:
            self.pool.free(req.blocks)
            req.blocks = []
        if error is None:
            self.stats.observe_e2e(time.monotonic() - req.arrival)
            self.stats.requests_ok += 1
        req._event.set()

    def _flush_events(self) -> None:
        if self.pool.events:
            events, self.pool.events = self.pool.events, []
            if self._on_events is not None:
                self._on_events(events)

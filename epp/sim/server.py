"""One simulated model server: aiohttp app (OpenAI API + vLLM extras) around an Engine."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from epp.sim.config import SimConfig
from epp.sim.engine import Engine, EngineError, Request
from epp.sim.kvevents import KVEventPublisher
from epp.sim.metrics import EngineStats, render_sglang, render_vllm
from epp.sim.tokenizer import render_chat, request_ids, sim_tokenizer, vocab_size

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def _error(message: str, status: int, kind: str, headers: dict[str, str]) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return _json(body, status=status, headers=headers)


def _prompt_text(body: dict[str, Any], chat: bool) -> str:
    """The prompt as text (chat: the rendered template); raises ValueError if malformed."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        return render_chat(messages)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("'prompt' must be a non-empty string or a list of token ids")
    return prompt


def _prompt_ids(body: dict[str, Any], chat: bool) -> list[int]:
    """Prompt token ids as vLLM computes them; raises ValueError if malformed."""
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            if not all(0 <= t < vocab_size() for t in prompt):
                raise ValueError("token id out of vocabulary")
            return list(prompt)
        _prompt_text(body, chat)  # validates the shape
    ids = request_ids("chat" if chat else "completions", body)
    if ids is None:
        raise ValueError("the prompt cannot be tokenized (chat template refused it?)")
    return ids


class SimServer:
    def __init__(self, cfg: SimConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.stats = EngineStats()
        self.kv_events = KVEventPublisher(cfg) if cfg.kv_events_port else None
        sim_tokenizer()  # load it now, not on the first request
        self.engine = Engine(cfg, self.stats, self.kv_events.publish if self.kv_events else None)
        self._rng = random.Random(cfg.seed or hash(cfg.address))
        self._headers = {"x-sim-server": cfg.address}
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._lifecycle: asyncio.Task[None] | None = None
        self.alive = False
        self.requests_total = 0
        # P/D and cancellation counters (harness-visible in /sim/state).
        self.prefill_only_total = 0  # requests with kv_transfer_params.do_remote_decode
        self.remote_prefilled_total = 0  # requests that started from a remote prefill
        self.aborted_total = 0  # requests the client abandoned before the end
        self.started_at = 0.0

    # ---------------------------------------------------------------- lifecycle
    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_post("/v1/completions", self._completions)
        r.add_post("/v1/chat/completions", self._chat)
        r.add_post("/v1/completions/render", self._render_completions)
        r.add_post("/v1/chat/completions/render", self._render_chat)
        r.add_post("/tokenize", self._tokenize)
        r.add_get("/v1/models", self._models)
        r.add_get("/health", self._health)
        r.add_get("/metrics", self._metrics)
        r.add_get("/get_load", self._get_load)
        r.add_get("/get_server_info", self._server_info)
        r.add_get("/get_model_info", self._model_info)
        r.add_get("/sim/state", self._state)
        r.add_post("/sim/reset", self._reset)
        return app

    async def start(self) -> None:
        self.started_at = time.monotonic()
        if self.kv_events:
            self.kv_events.start_replay()
        await self._bind()
        if self.cfg.die_after_s > 0:
            self._lifecycle = asyncio.create_task(self._die_and_return())

    async def _bind(self) -> None:
        self.engine.start()
        # handler_cancellation: a client that disconnects aborts its request, as vLLM does.
        self._runner = web.AppRunner(
            self._app(), access_log=None, handle_signals=False, handler_cancellation=True
        )
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port, reuse_address=True)
        await self._site.start()
        if self.cfg.port == 0 and self._runner.addresses:
            self.cfg.port = int(self._runner.addresses[0][1])
            self._headers["x-sim-server"] = self.cfg.address
        self.alive = True

    async def _unbind(self) -> None:
        self.alive = False
        await self.engine.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    async def _die_and_return(self) -> None:
        scale = self.cfg.time_scale
        await asyncio.sleep(self.cfg.die_after_s * scale)
        await self._unbind()
        if self.cfg.down_for_s <= 0:
            return
        await asyncio.sleep(self.cfg.down_for_s * scale)
        self.stats = EngineStats()
        if self.kv_events:
            # A restarted engine has a new publisher: its sequence starts again at 0, and
            # subscribers see the restart from that (vLLM sends no AllBlocksCleared then).
            self.kv_events.close()
            self.kv_events = KVEventPublisher(self.cfg)
            self.kv_events.start_replay()
        publish = self.kv_events.publish if self.kv_events else None
        self.engine = Engine(self.cfg, self.stats, publish)
        await self._bind()

    async def stop(self) -> None:
        if self._lifecycle is not None:
            self._lifecycle.cancel()
            self._lifecycle = None
        await self._unbind()
        if self.kv_events is not None:
            self.kv_events.close()

    # ---------------------------------------------------------------- inference
    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        h = self._headers
        self.requests_total += 1
        try:
            body = orjson.loads(await request.read())
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            ids = _prompt_ids(body, chat)
            max_tokens = int(
                body.get("max_completion_tokens") or body.get("max_tokens") or (256 if chat else 16)
            )
            if max_tokens < 1:
                raise ValueError("max_tokens must be >= 1")
        except (ValueError, TypeError, orjson.JSONDecodeError) as e:
            self.stats.requests_error += 1
            return _error(str(e), 400, "BadRequestError", h)
        model = body.get("model") or self.cfg.model
        if model != self.cfg.model:
            return _error(f"model {model!r} does not exist", 404, "NotFoundError", h)
        if self.cfg.error_rate > 0 and self._rng.random() < self.cfg.error_rate:
            self.stats.requests_error += 1
            return _error("injected failure", 500, "InternalServerError", h)

        kvp = body.get("kv_transfer_params") or {}
        remote_prefilled = bool(kvp.get("do_remote_prefill"))
        prefill_only = bool(kvp.get("do_remote_decode"))
        self.prefill_only_total += prefill_only
        self.remote_prefilled_total += remote_prefilled
        arrival = time.monotonic()
        scale = self.cfg.time_scale
        try:
            await asyncio.sleep(self.cfg.api_overhead_s * scale)
            if remote_prefilled:
                await asyncio.sleep(self.engine.kv_transfer_s(ids) * scale)
        except asyncio.CancelledError:
            self.aborted_total += 1  # gone before the engine saw it
            raise
        req = Request(
            prompt_ids=ids,
            max_tokens=max_tokens,
            seed=len(ids) + (ids[-1] if ids else 0),
            remote_prefilled=remote_prefilled,
            arrival=arrival,
        )
        if self.engine.queue_full():
            self.stats.requests_error += 1
            return _error("waiting queue is full", 429, "RateLimitError", h)
        try:
            self.engine.add(req)
        except EngineError as e:
            self.stats.requests_error += 1
            return _error(str(e), 400, "BadRequestError", h)

        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kv_out: dict[str, Any] | None = None
        if prefill_only:
            kv_out = {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_engine_id": f"sim-{self.cfg.address}",
                "remote_block_ids": list(range(-(-len(ids) // self.cfg.block_size))),
                "remote_host": self.cfg.host,
                "remote_port": self.cfg.port,
                "tp_size": 1,
            }
        try:
            if body.get("stream"):
                opts = body.get("stream_options") or {}
                return await self._stream(
                    request, req, rid, created, model, chat, bool(opts.get("include_usage")), kv_out
                )
            while await req.next_tokens():
                pass
        except (asyncio.CancelledError, ConnectionResetError):
            if not req.finished:
                self.aborted_total += 1
            self.engine.abort(req)
            raise
        if req.error is not None:
            self.stats.requests_error += 1
            return _error(req.error, 503, "ServiceUnavailableError", h)
        text_out = "".join(req.output_text)
        usage = self._usage(req)
        choice: dict[str, Any]
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text_out},
                "finish_reason": "length",
            }
        else:
            choice = {"index": 0, "text": text_out, "logprobs": None, "finish_reason": "length"}
        resp: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage,
        }
        if kv_out is not None:
            resp["kv_transfer_params"] = kv_out
        return _json(resp, headers=h)

    def _usage(self, req: Request) -> dict[str, Any]:
        return {
            "prompt_tokens": req.prompt_len,
            "completion_tokens": req.num_output,
            "total_tokens": req.prompt_len + req.num_output,
            "prompt_tokens_details": {"cached_tokens": req.num_cached},
        }

    async def _stream(
        self,
        request: web.Request,
        req: Request,
        rid: str,
        created: int,
        model: str,
        chat: bool,
        include_usage: bool,
        kv_out: dict[str, Any] | None,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, **self._headers})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = b'data: {"id":"' + rid.encode() + b'","object":"' + obj.encode()
        head += b'","created":' + str(created).encode() + b',"model":' + orjson.dumps(model)
        first = True
        while True:
            pieces = await req.next_tokens()
            if not pieces:
                break
            chunks = []
            for p in pieces:
                if chat:
                    delta: dict[str, str] = {"content": p}
                    if first:
                        delta["role"] = "assistant"
                        first = False
                    choice = {"index": 0, "delta": delta, "finish_reason": None}
                else:
                    choice = {"index": 0, "text": p, "logprobs": None, "finish_reason": None}
                chunks.append(head + b',"choices":[' + orjson.dumps(choice) + b"]}\n\n")
            await resp.write(b"".join(chunks))
        if req.error is not None:
            err = {"error": {"message": req.error, "type": "ServiceUnavailableError", "code": 503}}
            await resp.write(b"data: " + orjson.dumps(err) + b"\n\n")
            await resp.write_eof()
            return resp
        last: dict[str, Any] = (
            {"index": 0, "delta": {}, "finish_reason": "length"}
            if chat
            else {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
        )
        tail = head + b',"choices":[' + orjson.dumps(last) + b"]"
        if kv_out is not None:
            tail += b',"kv_transfer_params":' + orjson.dumps(kv_out)
        out = [tail + b"}\n\n"]
        if include_usage:
            out.append(head + b',"choices":[],"usage":' + orjson.dumps(self._usage(req)) + b"}\n\n")
        out.append(b"data: [DONE]\n\n")
        await resp.write(b"".join(out))
        await resp.write_eof()
        return resp

    # ---------------------------------------------------------------- auxiliary endpoints
    async def _tokenize(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
            ids = _prompt_ids(body, chat="messages" in body)
        except (ValueError, TypeError, orjson.JSONDecodeError) as e:
            return _error(str(e), 400, "BadRequestError", self._headers)
        return _json(
            {"count": len(ids), "max_model_len": self.cfg.max_model_len, "tokens": ids},
            headers=self._headers,
        )

    async def _render(self, request: web.Request, chat: bool) -> web.Response:
        try:
            body = orjson.loads(await request.read())
            text = _prompt_text(body, chat)
            ids = _prompt_ids(body, chat)
        except (ValueError, TypeError, orjson.JSONDecodeError) as e:
            return _error(str(e), 400, "BadRequestError", self._headers)
        return _json(
            {"prompt": text, "prompt_token_ids": ids, "token_ids": ids, "count": len(ids)},
            headers=self._headers,
        )

    async def _render_completions(self, request: web.Request) -> web.Response:
        return await self._render(request, chat=False)

    async def _render_chat(self, request: web.Request) -> web.Response:
        return await self._render(request, chat=True)

    async def _models(self, request: web.Request) -> web.Response:
        card = {
            "id": self.cfg.model,
            "object": "model",
            "created": int(self.started_at),
            "owned_by": "epp.sim",
            "root": self.cfg.model,
            "max_model_len": self.cfg.max_model_len,
        }
        return _json({"object": "list", "data": [card]}, headers=self._headers)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200, headers=self._headers)

    async def _get_load(self, request: web.Request) -> web.Response:
        load = self.engine.num_waiting + self.engine.num_running
        return _json({"load": load}, headers=self._headers)

    async def _server_info(self, request: web.Request) -> web.Response:
        return _json(
            {
                "model_path": self.cfg.model,
                "page_size": self.cfg.block_size,
                "max_running_requests": self.cfg.max_num_seqs,
                "disaggregation_mode": "null" if self.cfg.role == "both" else self.cfg.role,
            },
            headers=self._headers,
        )

    async def _model_info(self, request: web.Request) -> web.Response:
        return _json({"model_path": self.cfg.model, "is_generation": True}, headers=self._headers)

    async def _metrics(self, request: web.Request) -> web.Response:
        render = render_sglang if self.cfg.engine == "sglang" else render_vllm
        text = render(
            self.stats,
            model=self.cfg.model,
            waiting=self.engine.num_waiting,
            running=self.engine.num_running,
            kv_usage=self.engine.pool.usage(),
            block_size=self.cfg.block_size,
            num_blocks=self.cfg.num_gpu_blocks,
        )
        return web.Response(text=text, content_type="text/plain", headers=self._headers)

    def state(self) -> dict[str, Any]:
        s = self.stats
        return {
            "address": self.cfg.address,
            "role": self.cfg.role,
            "alive": self.alive,
            "waiting": self.engine.num_waiting,
            "running": self.engine.num_running,
            "kv_usage": self.engine.pool.usage(),
            "cached_blocks": self.engine.pool.num_cached,
            "evictions": self.engine.pool.evictions,
            "requests_total": self.requests_total,
            "prefill_only_total": self.prefill_only_total,
            "remote_prefilled_total": self.remote_prefilled_total,
            "aborted_total": self.aborted_total,
            "requests_ok": s.requests_ok,
            "requests_error": s.requests_error,
            "prompt_tokens": s.prompt_tokens,
            "generation_tokens": s.generation_tokens,
            "prefix_queries": s.prefix_queries,
            "prefix_hits": s.prefix_hits,
            "preemptions": s.preemptions,
            "steps": self.engine.steps,
            "busy_model_s": self.engine.busy_time,
        }

    async def _state(self, request: web.Request) -> web.Response:
        return _json(self.state(), headers=self._headers)

    async def _reset(self, request: web.Request) -> web.Response:
        """Clear the prefix cache and counters between benchmark phases."""
        ok = self.engine.reset_cache()
        if ok:
            self.stats = EngineStats()
            self.engine.stats = self.stats
            self.requests_total = 0
            self.prefill_only_total = self.remote_prefilled_total = self.aborted_total = 0
        return _json({"reset": ok}, status=200 if ok else 409, headers=self._headers)


"""vLLM's NIXL-style two-phase protocol (`kv_transfer_params`; llm-d's "nixlv2").

1. The prefill pod gets the request with `max_tokens: 1` (and `max_completion_tokens: 1`
   for chat), `stream: false`, no `stream_options`, and
   `kv_transfer_params: {do_remote_decode: true, do_remote_prefill: false, remote_*: null}`.
   It runs the prefill, keeps the KV blocks for the decode pod to pull, and answers with
   `kv_transfer_params` (`do_remote_prefill: true`, `remote_engine_id`, `remote_block_ids`,
   `remote_host`, `remote_port`, ...).
2. The local engine gets the client's original request plus those `kv_transfer_params`:
   it pulls the KV blocks and starts at decode.
"""

from __future__ import annotations

from typing import Any, ClassVar

import aiohttp
import orjson

from epp.sidecar.connectors.base import (
    Connector,
    DecodePlan,
    PrefillFailed,
    PrefillRejected,
    PrefillRequest,
    status_failure,
)

KV_PARAMS = "kv_transfer_params"
_PREFILL_KV = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def prefill_body(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    out = dict(body)
    out.pop("stream_options", None)
    out.pop("min_tokens", None)  # would exceed max_tokens=1
    out["stream"] = False
    out["max_tokens"] = 1
    if chat or "max_completion_tokens" in body:
        out["max_completion_tokens"] = 1
    out[KV_PARAMS] = dict(_PREFILL_KV)
    return out


class NixlConnector(Connector):
    name: ClassVar[str] = "nixlv2"

    async def prepare(self, req: PrefillRequest) -> DecodePlan:
        data = orjson.dumps(prefill_body(req.body, req.chat))
        try:
            async with req.http.post(req.url, data=data, headers=req.headers) as r:
                raw = await r.read()
                status = r.status
                content_type = r.headers.get("content-type", "application/json")
        except aiohttp.ClientConnectorError as e:
            raise PrefillFailed("connect", f"cannot connect to prefill pod: {e}") from e
        except (aiohttp.ClientError, OSError) as e:
            raise PrefillFailed("connection", f"prefill connection failed: {e!r}") from e
        if status != 200:
            failure = status_failure(status)
            if failure is not None:
                raise failure
            raise PrefillRejected(status, raw, content_type)
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise PrefillFailed("bad_answer", "prefill answer is not JSON") from e
        kv = answer.get(KV_PARAMS) if isinstance(answer, dict) else None
        if not isinstance(kv, dict) or not kv:
            raise PrefillFailed("no_kv_params", "prefill answer carries no kv_transfer_params")
        decode = dict(req.body)
        decode[KV_PARAMS] = kv
        detail = {"remote_engine_id": kv.get("remote_engine_id")}
        return DecodePlan(orjson.dumps(decode), detail=detail)

    def strip_client_params(self, body: dict[str, Any]) -> bool:
        return body.pop(KV_PARAMS, None) is not None

"""A simple model-server stand-in that reports what it received (test helper).

Serves on several loopback IPs at once. POST answers JSON with who served it, the request
headers and a digest of the body; `"stream": true` answers SSE with `n_chunks` chunks
`chunk_ms` apart, like an OpenAI stream. `"hold_ms"` delays the response.

    python -m tests.integration.echo_backend --ips 127.0.0.2,127.0.0.3 --port 8100
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib

import orjson
from aiohttp import web


def make_app(served_by: str) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            data = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        hold = float(data.get("hold_ms", 0)) / 1000.0
        if hold:
            await asyncio.sleep(hold)
        info = {
            "served_by": served_by,
            "path": request.path,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "model": data.get("model"),
            "received_model": data.get("model"),  # not a "model" key: never rewritten back
        }
        if data.get("stream"):
            resp = web.StreamResponse(
                headers={"content-type": "text/event-stream", "x-served-by": served_by}
            )
            await resp.prepare(request)
            n = int(data.get("n_chunks", 5))
            delay = float(data.get("chunk_ms", 20)) / 1000.0
            for i in range(n):
                chunk = {"choices": [{"index": 0, "text": f"t{i} "}], "model": data.get("model")}
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                await asyncio.sleep(delay)
            usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}}
            await resp.write(b"data: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n")
            await resp.write_eof()
            return resp
        return web.json_response(
            info, headers={"x-served-by": served_by}, dumps=lambda o: orjson.dumps(o).decode()
        )

    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(ips: list[str], port: int) -> None:
    runners = []
    for ip in ips:
        runner = web.AppRunner(make_app(f"{ip}:{port}"), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, ip, port).start()
        runners.append(runner)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ips", required=True)
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    asyncio.run(serve(a.ips.split(","), a.port))


if __name__ == "__main__":
    main()

"""CPU per request of the EPP's own ext_proc handling, gRPC left out.

    python -m bench.extproc_cpu [--json] [--requests N] [--concurrency C] [--profile]

`bench.proxy` measures the whole path (Envoy, gRPC, the EPP) and is noisy; this drives the
real servicer (`ExtProcServicer.Process` of an `epp serve` app with its default config and
four endpoints, as `bench.proxy` runs it) in-process with the messages Envoy 1.40 sends
there for one small completion request: the request headers with `protocol_config`
FULL_DUPLEX_STREAMED, the body, an empty end-of-stream body message (Envoy's HTTP/1 codec
sends the end apart), the response headers. A stand-in context replaces gRPC's (read
returns the next message, write drops the answer), so what is timed is the EPP's own
Python per request: parse, admission, flow control, scheduling, the protobuf answers,
bookkeeping, metrics. `C` streams run at once (`asyncio.gather`), as Envoy's concurrent
streams would; the release of each request's load, which the EPP schedules for its
expected end, runs on the loop as in production.

Output: CPU µs per request after a warm-up, N requests in `--rounds` rounds: the fastest
round (the least disturbed by the rest of the machine) and the median; and with `--profile` the cProfile
table of the same run by own time; `machine_loop_ms` (`bench.machine`) says how fast this
machine runs plain Python.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from bench.machine import python_loop_ms
from epp.api.headers import DESTINATION, DESTINATION_SERVED, LB_METADATA_NAMESPACE
from epp.devstack.procs import free_port
from epp.extproc.server import ExtProcServicer, ExtProcSettings

ENDPOINTS = [f"127.0.4.{i}" for i in (2, 3, 4, 5)]
PORT = 8000
BODY = orjson.dumps({"model": "bench", "prompt": "Say hi.", "max_tokens": 8})
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]


def _headers(pairs: list[tuple[str, str]]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]
    )


def envoy_messages(request_id: str, served: str) -> list[pb.ProcessingRequest]:
    """One request's messages to the EPP, as Envoy sends them in bench.proxy's setup."""
    request = _headers(
        [
            (":authority", "127.0.0.1:10000"),
            (":path", "/v1/completions"),
            (":method", "POST"),
            (":scheme", "http"),
            ("content-length", str(len(BODY))),
            ("content-type", "application/json"),
            ("x-forwarded-proto", "http"),
            ("x-request-id", request_id),
        ]
    )
    response = _headers(
        [
            (":status", "200"),
            ("content-type", "application/json"),
            ("content-length", "188"),
            ("date", "Wed, 02 Dec 2026 13:47:20 GMT"),
            ("server", "envoy"),
            ("x-envoy-upstream-service-time", "0"),
            (DESTINATION_SERVED, served),
            ("x-envoy-attempt-count", "1"),
        ]
    )
    lb = struct_pb2.Struct()
    fields = lb.fields[LB_METADATA_NAMESPACE].struct_value.fields
    fields[DESTINATION].string_value = served
    fields[DESTINATION_SERVED].string_value = served
    mode = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
    return [
        pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(headers=request),
            protocol_config=pb.ProtocolConfiguration(request_body_mode=mode),
        ),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=BODY)),
        pb.ProcessingRequest(request_body=pb.HttpBody(end_of_stream=True)),
        pb.ProcessingRequest(
            response_headers=pb.HttpHeaders(headers=response),
            metadata_context=base_pb2.Metadata(filter_metadata={"envoy.lb": lb}),
        ),
    ]


class _Context:
    """Stands in for grpc.aio's servicer context: the read/write calls `Process` makes."""

    __slots__ = ("_next", "written")

    def __init__(self, msgs: list[pb.ProcessingRequest]) -> None:
        self._next = iter(msgs).__next__
        self.written = 0

    async def read(self) -> object:
        try:
            return self._next()
        except StopIteration:
            return _EOF

    async def write(self, _message: pb.ProcessingResponse) -> None:
        self.written += 1


async def _app(workdir: Path) -> Any:
    from epp.cli import make_parser
    from epp.serve import App

    endpoints = workdir / "endpoints.yaml"
    endpoints.write_text(
        "endpoints:\n" + "".join(f"  - address: {ip}\n    port: {PORT}\n" for ip in ENDPOINTS)
    )
    args = make_parser("serve").parse_args(
        [
            "--endpoints-file", str(endpoints),
            "--bind-address", "127.0.0.1",
            "--grpc-port", str(free_port()),
            "--grpc-health-port", str(free_port()),
            "--metrics-port", str(free_port()),
            "--scrape-interval", "0",  # bench.proxy's backends have no /metrics
        ]
    )  # fmt: skip
    app = App(args)
    await app.start()
    return app


async def measure(
    requests: int, concurrency: int, profile: bool, rounds: int = 10
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="epp-extproc-cpu-") as tmp:
        app = await _app(Path(tmp))
        try:
            servicer = ExtProcServicer(app.director, app.metrics, ExtProcSettings())
            # Distinct request ids (the EPP keys its bookkeeping by them), built beforehand.
            total = requests + max(200, requests // 10)
            streams = [
                envoy_messages(f"req-{i}", f"{ENDPOINTS[i % len(ENDPOINTS)]}:{PORT}")
                for i in range(total)
            ]
            written = 0

            async def one(msgs: list[pb.ProcessingRequest]) -> None:
                nonlocal written
                ctx = _Context(msgs)
                await servicer.Process(None, ctx)  # type: ignore[arg-type]
                written += ctx.written

            async def run(batch: list[list[pb.ProcessingRequest]]) -> None:
                for start in range(0, len(batch), concurrency):
                    await asyncio.gather(*(one(m) for m in batch[start : start + concurrency]))

            await run(streams[requests:])  # warm-up
            prof = cProfile.Profile() if profile else None
            cpu_us: list[float] = []
            wall_us: list[float] = []
            size = -(-requests // rounds)
            for start in range(0, requests, size):
                batch = streams[start : start + size]
                t0, w0 = time.process_time(), time.perf_counter()
                if prof is not None:
                    prof.enable()
                await run(batch)
                if prof is not None:
                    prof.disable()
                cpu_us.append(1e6 * (time.process_time() - t0) / len(batch))
                wall_us.append(1e6 * (time.perf_counter() - w0) / len(batch))
            out: dict[str, Any] = {
                "machine_loop_ms": python_loop_ms(),
                "requests": requests,
                "concurrency": concurrency,
                "rounds": len(cpu_us),
                # The fastest round is the least disturbed by the rest of the machine.
                "us_per_request_min": round(min(cpu_us), 1),
                "us_per_request_median": round(statistics.median(cpu_us), 1),
                "wall_us_per_request_median": round(statistics.median(wall_us), 1),
                "answers_per_request": round(written / total, 2),
                "profiled": profile,
            }
            if prof is not None:
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
                out["profile"] = text.getvalue()
            return out
        finally:
            await app.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (min and median)")
    p.add_argument("--profile", action="store_true", help="cProfile the measured run")
    a = p.parse_args(argv)
    if min(a.requests, a.concurrency, a.rounds) < 1:
        p.error("--requests, --concurrency and --rounds must be at least 1")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of epp serve
        result = asyncio.run(measure(a.requests, a.concurrency, a.profile, a.rounds))
    else:
        result = uvloop.run(measure(a.requests, a.concurrency, a.profile, a.rounds))
    if a.json:
        result.pop("profile", None)
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    else:
        for key, value in result.items():
            if key != "profile":
                print(f"{key}: {value}")
        if "profile" in result:
            print(result["profile"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A do-nothing ext_proc server: the ceiling of any Python gRPC ext_proc path (bench.proxy).

    python -m bench.null_extproc --port P --endpoints 127.0.4.2:8000,127.0.4.3:8000

Not a router: it speaks the same ext_proc exchange as `epp serve` (FULL_DUPLEX_STREAMED:
the headers response held until the body's end, then the body echoed; BUFFERED: the headers
answered at once, the routing mutation on the body's answer; response headers answered when
Envoy sends them) on the same grpc.aio server and event loop, but
picks endpoints round-robin and keeps no state. What Envoy + this server sustains on a box
is what the EPP's own work (parse, admission, scheduling, bookkeeping) is measured against.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from collections.abc import AsyncIterator

import grpc
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from epp.api.headers import DESTINATION
from epp.extproc import messages as m

_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # (absent from grpc-stubs)
_BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED


class NullProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, endpoints: list[str]) -> None:
        self._next = itertools.cycle(endpoints).__next__

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> None:
        read, write = context.read, context.write
        chunks: list[bytes] = []
        buffered = False
        while True:
            msg = await read()
            if msg is _EOF:
                return
            kind = msg.WhichOneof("request")
            if kind == "request_body":
                body = msg.request_body
                chunks.append(body.body)
                if body.end_of_stream:
                    dest = self._next()
                    mutation = m.header_mutation({DESTINATION: dest}, ())
                    metadata = m.destination_metadata(DESTINATION, dest)
                    if buffered:
                        await write(m.buffered_body_response(mutation, metadata, None))
                        continue
                    await write(m.headers_response(mutation, metadata))
                    for out in m.streamed_body(b"".join(chunks)):
                        await write(out)
            elif kind == "request_headers":
                buffered = msg.protocol_config.request_body_mode == _BUFFERED
                if buffered:
                    await write(m.headers_continue())
            elif kind == "response_headers":
                await write(m.response_headers_continue())
            elif kind == "request_trailers":
                await write(m.request_trailers_continue())


async def serve(port: int, endpoints: list[str]) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(NullProcessor(endpoints), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--endpoints", required=True, help="comma list of host:port, round-robin")
    a = p.parse_args(argv)
    endpoints = [e for e in a.endpoints.split(",") if e]
    try:  # the same loop as `epp serve`
        import uvloop
    except ImportError:
        asyncio.run(serve(a.port, endpoints))
        return
    uvloop.run(serve(a.port, endpoints))


if __name__ == "__main__":
    main()

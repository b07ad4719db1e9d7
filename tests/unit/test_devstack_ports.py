"""The dev stack's port picker never hands one port out twice (a stack whose Envoy and EPP
got the same port failed to start, once in `make test`)."""

from __future__ import annotations

import socket

from epp.devstack.procs import free_port


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", ports[-1]))

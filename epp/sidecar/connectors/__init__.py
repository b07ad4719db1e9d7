"""P/D connectors, one per file; `CONNECTORS` maps the `--connector` name to its class."""

from __future__ import annotations

from typing import Any

from epp.sidecar.connectors.base import Connector
from epp.sidecar.connectors.nixl import NixlConnector
from epp.sidecar.connectors.sglang import SGLangConnector

CONNECTORS: dict[str, type[Connector]] = {
    NixlConnector.name: NixlConnector,
    SGLangConnector.name: SGLangConnector,
}


def make_connector(name: str, settings: Any = None) -> Connector:
    """`settings`: the sidecar's settings, for connectors that need options."""
    cls = CONNECTORS.get(name)
    if cls is None:
        raise ValueError(f"unknown connector {name!r}; known: {', '.join(CONNECTORS)}")
    return cls.from_settings(settings)

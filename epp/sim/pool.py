"""Host many simulated servers in one asyncio process."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.sim.config import SimConfig
from epp.sim.server import SimServer


@dataclass(slots=True)
class ServerHandle:
    server: SimServer

    @property
    def address(self) -> str:
        return self.server.cfg.address

    @property
    def url(self) -> str:
        return f"http://{self.server.cfg.address}"

    @property
    def config(self) -> SimConfig:
        return self.server.cfg


async def start_pool(configs: Sequence[SimConfig]) -> list[ServerHandle]:
    """Start one server per config (port 0 picks a free port); stop them with stop_pool."""
    handles: list[ServerHandle] = []
    try:
        for cfg in configs:
            server = SimServer(cfg.replace())
            await server.start()
            handles.append(ServerHandle(server))
    except BaseException:
        await stop_pool(handles)
        raise
    return handles


async def stop_pool(handles: Sequence[ServerHandle]) -> None:
    for h in handles:
        await h.server.stop()

"""P/D sidecars for the dev stack, tests and benchmarks: one `epp sidecar` process in front
of each decode engine, on the decode pod's IP, allowed to dial only the prefill engines.

    sidecars = await start_sidecars(decode_engines, prefill_engines, workdir)
    endpoints = pd_endpoints(prefill_engines, sidecars)     # for start_gateway
    ...
    stop_sidecars(sidecars)

As in a pod, the EPP sees a decode pod at the sidecar's address; prefill pods are their
engines directly.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epp.devstack.procs import free_port, stop_process, wait_http


@dataclass
class SidecarHandle:
    host: str
    port: int
    engine: tuple[str, int]
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def metrics_url(self) -> str:
        return f"{self.url}/sidecar/metrics"


def sidecar_command(
    host: str,
    port: int,
    engine: tuple[str, int],
    allowed_prefill: Sequence[str],
    extra_args: Sequence[str] = (),
) -> list[str]:
    return [
        sys.executable, "-m", "epp.cli", "sidecar", "--host", host, "--port", str(port),
        "--engine-url", f"http://{engine[0]}:{engine[1]}",
        "--allowed-prefill", ",".join(allowed_prefill), *extra_args,
    ]  # fmt: skip


async def start_sidecars(
    decode_engines: Sequence[tuple[str, int]],
    prefill_engines: Sequence[tuple[str, int]],
    workdir: Path,
    *,
    extra_args: Sequence[str] = (),
    allowed_prefill: Sequence[str] | None = None,
) -> list[SidecarHandle]:
    """One sidecar per decode engine, on the engine's IP and a free port; ready when each
    answers /readyz (its engine is up). `allowed_prefill` defaults to the prefill engines."""
    allowed = list(allowed_prefill) if allowed_prefill is not None else [
        f"{h}:{p}" for h, p in prefill_engines
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    out: list[SidecarHandle] = []
    try:
        for i, (host, eport) in enumerate(decode_engines):
            port = free_port(host)
            log = workdir / f"sidecar-{i}.log"
            with log.open("wb") as fh:
                proc = subprocess.Popen(
                    sidecar_command(host, port, (host, eport), allowed, extra_args),
                    stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )  # fmt: skip
            out.append(SidecarHandle(host, port, (host, eport), proc, log))
        for sc in out:
            await wait_http(f"{sc.url}/readyz", proc=sc.proc)
    except BaseException:
        stop_sidecars(out)
        raise
    return out


def stop_sidecars(sidecars: Sequence[SidecarHandle]) -> None:
    for sc in sidecars:
        stop_process(sc.proc)


def pd_endpoints(
    prefill_engines: Sequence[tuple[str, int]],
    sidecars: Sequence[SidecarHandle],
    labels: dict[str, str] | None = None,
    names: tuple[str, str] = ("prefill", "decode"),
) -> list[dict[str, Any]]:
    """Endpoints-file entries: prefill pods at their engines, decode pods at their sidecars."""
    base = dict(labels or {})
    out: list[dict[str, Any]] = [
        {"address": h, "port": p, "name": f"{names[0]}-{i}", "labels": {**base, "role": "prefill"}}
        for i, (h, p) in enumerate(prefill_engines)
    ]
    out += [
        {"address": sc.host, "port": sc.port, "name": f"{names[1]}-{i}",
         "labels": {**base, "role": "decode"}}
        for i, sc in enumerate(sidecars)
    ]  # fmt: skip
    return out

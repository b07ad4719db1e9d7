"""End to end on a real API server: a P/D ModelPool (manifests/samples/modelpool-sim-pd.yaml)
becomes prefill and decode Deployments, the decode pods carrying the P/D sidecar, plus the
pool's EPP; requests through Envoy + that EPP are prefilled on a prefill pod and decoded on a
decode pod.

Nothing is started by hand but Envoy: in a namespace labelled for it, the test cluster's
fake kubelet runs the rendered containers of the project's image as processes on the pod
IPs (hack/kube/pod_processes.py): the simulator engines, the `epp sidecar` containers with
their rendered arguments and a token of the rendered ServiceAccount (so the sidecars' prefill
allow-list comes from the InferencePool's pods through the API with only the rendered Role),
and the EPP. Pods are Ready by their rendered readiness probes.
"""

from __future__ import annotations

import contextlib
import random
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from bench.scenarios.workload import text_of
from epp.datalayer.eds_file import write_eds
from epp.devstack.envoy import EnvoyOptions, render_envoy_config, start_envoy
from epp.devstack.procs import free_port, wait_http
from epp.reconcile.assignment import list_pool_pods
from epp.reconcile.controller import Controller
from epp.reconcile.kube import Kube, path_for
from epp.reconcile.reconciler import pool_path
from hack.kube.cluster import REPO, Cluster
from hack.kube.pod_processes import RUN_LABEL
from tests.kube.helpers import until_async
from tests.kube.test_reconcile_e2e import Procs

POOL = "sim-pd"
MODEL = "sim-llama"


def pool_doc(ns: str, port: int) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(
        (REPO / "manifests" / "samples" / "modelpool-sim-pd.yaml").read_text())
    doc["metadata"] = {"name": POOL, "namespace": ns}
    doc["spec"]["port"] = port
    fast = ["--time-scale", "0.2"]  # simulated GPUs 5x faster than the modelled H100
    for role in ("prefill", "decode"):
        doc["spec"]["roles"][role]["extraArgs"] = fast
    doc["spec"]["sidecar"]["extraArgs"] = ["--log-level", "debug"]
    return doc


async def state(session: aiohttp.ClientSession, hostport: str) -> dict[str, Any]:
    async with session.get(f"http://{hostport}/sim/state") as r:
        data: dict[str, Any] = await r.json()
        return data


async def chat(session: aiohttp.ClientSession, url: str, content: str,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
    async with session.post(url + "/v1/chat/completions", data=orjson.dumps(body),
                            headers={"content-type": "application/json", **(headers or {})},
                            timeout=aiohttp.ClientTimeout(total=30)) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


async def _ok(call: Any) -> tuple[int, dict[str, str], bytes] | None:
    try:
        res: tuple[int, dict[str, str], bytes] = await call
    except (aiohttp.ClientError, TimeoutError):
        return None
    return res if res[0] == 200 else None


async def test_pd_modelpool_prefills_remotely_through_envoy_and_epp(
        cluster: Cluster, kube: Kube, kube_ns: str, controller: Controller,
        tmp_path: Path) -> None:
    cluster.kubectl("label", "namespace", kube_ns, f"{RUN_LABEL}=true")
    port = free_port()
    await kube.create(pool_path(kube_ns), pool_doc(kube_ns, port))

    async def ready_pods() -> dict[str, list[str]] | None:
        by_role: dict[str, list[str]] = {"prefill": [], "decode": []}
        for pod in await list_pool_pods(kube, kube_ns, POOL):
            conds = {c["type"]: c["status"] for c in pod["status"].get("conditions") or []}
            if conds.get("Ready") == "True":
                by_role[pod["metadata"]["labels"]["role"]].append(pod["status"]["podIP"])
        return by_role if all(len(v) == 2 for v in by_role.values()) else None

    async def epp_ip() -> str | None:
        pods = await kube.list_objects(path_for("v1", "pods", kube_ns))
        for pod in pods.get("items") or []:
            conds = {c["type"]: c["status"] for c in pod["status"].get("conditions") or []}
            if pod["metadata"]["name"].startswith(f"{POOL}-epp-") and conds.get("Ready") == "True":
                return str(pod["status"]["podIP"])
        return None

    # Ready by the rendered probes: engines on /health, sidecars on /readyz (engine up and
    # the allow-list synced from the API with the sidecar's own ServiceAccount token).
    pods = await until_async(ready_pods, 90, "2 prefill + 2 decode pods running and Ready")
    epp = await until_async(epp_ip, 60, "the pool's EPP running and Ready")
    dep = await kube.get(path_for("apps/v1", "deployments", kube_ns, f"{POOL}-decode"))
    engine_port = int(next(c for c in dep["spec"]["template"]["spec"]["containers"]
                           if c["name"] == "engine")["ports"][0]["containerPort"])
    assert engine_port != port

    procs = Procs(tmp_path)
    try:
        # The gateway knows the InferencePool's endpoints (here: an EDS file of the pod IPs
        # on the target port), so the EPP's fallback lists work as with any real gateway.
        eds = procs.workdir / "eds.yaml"
        write_eds(eds, "pool", [(ip, port) for ip in pods["prefill"] + pods["decode"]])
        opts = EnvoyOptions(listen_port=free_port(), admin_port=free_port(), epp_host=epp,
                            epp_ports=[9002], eds_path=str(eds))
        envoy = procs.add(start_envoy(render_envoy_config(opts), procs.workdir))
        await wait_http(f"http://127.0.0.1:{opts.admin_port}/ready", proc=envoy)
        url = f"http://127.0.0.1:{opts.listen_port}"

        prefill = {f"{ip}:{port}" for ip in pods["prefill"]}
        decode_engines = {f"{ip}:{engine_port}" for ip in pods["decode"]}
        async with aiohttp.ClientSession() as s:
            # A long fresh prompt: prefilled on a prefill pod, decoded on a decode pod (the
            # decode engine answers, behind its sidecar on the pod's serving port).
            before = {a: await state(s, a) for a in prefill | decode_engines}
            _, headers, raw = await until_async(
                lambda: _ok(chat(s, url, text_of(random.Random("kube"), 3000))), 30,
                "a request through Envoy and the pool's EPP")
            after = {a: await state(s, a) for a in prefill | decode_engines}
            assert headers["x-epp-pd"] == "disaggregated", raw[:300]
            assert headers["x-sim-server"] in decode_engines
            delta = {a: (after[a]["prefill_only_total"] - before[a]["prefill_only_total"],
                         after[a]["remote_prefilled_total"] - before[a]["remote_prefilled_total"])
                     for a in after}
            assert sorted(v for a, v in delta.items() if a in prefill) == [(0, 0), (1, 0)]
            assert delta[headers["x-sim-server"]] == (0, 1)
            # A short prompt stays on its decode pod.
            st, h, raw = await chat(s, url, "a short question")
            assert st == 200 and h["x-epp-pd"] == "local", raw[:300]

            # The allow-list is the pool's prefill pods: a decode pod of the same pool and a
            # host outside the pool are refused by the sidecar, a prefill pod is dialled.
            sidecar = f"http://{pods['decode'][0]}:{port}"
            for target in (f"{pods['decode'][1]}:{port}", f"127.0.9.99:{port}"):
                st, _, body = await chat(s, sidecar, "hi", {"x-prefiller-host-port": target})
                assert st == 400, body
                assert orjson.loads(body)["error"]["code"] == "prefill_target_refused"
            st, h, _ = await chat(s, sidecar, text_of(random.Random("direct"), 500),
                                  {"x-prefiller-host-port": f"{pods['prefill'][1]}:{port}"})
            assert st == 200 and h["x-epp-pd"] == "disaggregated"
    except BaseException:
        with contextlib.suppress(Exception):
            async with aiohttp.ClientSession() as s:
                st, h, raw = await chat(s, url, text_of(random.Random("diag"), 3000))
                sys.stderr.write(f"--- a request now: HTTP {st} {h} {raw[:300]!r}\n")
        sys.stderr.write(procs.logs())
        for log in sorted((cluster.workdir / "pods").glob(f"{kube_ns}_*/*.log")):
            sys.stderr.write(f"--- {log.parent.name}/{log.name}\n"
                             f"{log.read_text(errors='replace')[-2000:]}\n")
        raise
    finally:
        procs.stop_all()

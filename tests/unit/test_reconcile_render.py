"""Render, merge, template, artifacts, CRD: the pure half of the reconciler."""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from epp.api.modelpool import ModelPool, model_label_value
from epp.reconcile import artifacts, crdgen, render, template
from epp.reconcile.cli_render import load_documents, render_documents
from epp.reconcile.merge import merge

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLES = sorted((ROOT / "manifests/samples").glob("modelpool-*.yaml"))


def pool_doc(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "epp.dev/v1alpha1",
        "kind": "ModelPool",
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-1"},
        "spec": {"model": {"name": "org/m", "uri": "hf://org/m"}, "engine": "vllm"},
    }
    base["spec"].update(spec)
    return base


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def engine_of(dep: dict[str, Any]) -> dict[str, Any]:
    containers = dep["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "engine")


def test_objects_and_labels() -> None:
    pool = ModelPool.from_dict(pool_doc(
        roles={"prefill": {"replicas": 2}, "decode": {"replicas": 3}},
        businesses=[
            {"name": "production", "replicas": 2, "criticality": "Critical",
             "match": {"hostnames": ["a.example"]}},
            {"name": "testing", "share": 1, "criticality": "Critical",
             "match": {"hostnames": ["b.example"]}},
        ],
        gateway={"parentRefs": [{"name": "gw"}]},
    ))
    objs = render.render(pool)
    kinds = [o["kind"] for o in objs]
    epp = ["ServiceAccount", "Role", "RoleBinding", "Service", "Deployment",
           "PodDisruptionBudget"]  # the pool's own EPP (test_reconcile_render_epp.py)
    pd = ["ServiceAccount", "Role", "RoleBinding"]  # the P/D sidecar (render_pd.py)
    assert kinds == [*epp, *pd, "Service", "Service", "Deployment", "Deployment", "InferencePool",
                     "InferenceModel", "HTTPRoute", "HTTPRoute"]
    for o in objs:
        assert o["metadata"]["namespace"] == "ns"
        assert o["metadata"]["labels"]["epp.dev/pool"] == "p"
        ref = o["metadata"]["ownerReferences"][0]
        assert (ref["kind"], ref["uid"], ref["controller"]) == ("ModelPool", "u-1", True)
    deps = {d["metadata"]["name"]: d for d in by_kind(objs, "Deployment")}
    dec = deps["p-decode"]
    assert dec["spec"]["replicas"] == 3 and deps["p-prefill"]["spec"]["replicas"] == 2
    labels = dec["spec"]["template"]["metadata"]["labels"]
    assert labels["model"] == "org--m" and labels["business"] == "unassigned"
    assert labels["role"] == "decode"
    # business must not be in the selector, or relabelling would orphan pods
    assert "business" not in dec["spec"]["selector"]["matchLabels"]
    assert set(dec["spec"]["selector"]["matchLabels"].items()) <= set(labels.items())
    ip = by_kind(objs, "InferencePool")[0]
    assert ip["apiVersion"] == "inference.networking.k8s.io/v1"
    assert ip["spec"]["selector"]["matchLabels"] == {"epp.dev/pool": "p"}
    assert ip["spec"]["targetPorts"] == [{"number": 8000}]
    assert ip["spec"]["endpointPickerRef"] == {
        "group": "", "kind": "Service", "name": "p-epp", "port": {"number": 9002},
        "failureMode": "FailClose"}
    im = by_kind(objs, "InferenceModel")[0]
    assert im["spec"]["modelName"] == "org/m" and im["spec"]["criticality"] == "Critical"
    assert im["spec"]["poolRef"]["name"] == "p"
    routes = {r["metadata"]["name"]: r for r in by_kind(objs, "HTTPRoute")}
    rule = routes["p-testing"]["spec"]["rules"][0]
    assert rule["filters"][0]["requestHeaderModifier"]["set"] == [
        {"name": "x-business", "value": "testing"}]
    assert rule["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "p"}]
    assert routes["p-testing"]["spec"]["hostnames"] == ["b.example"]
    assert routes["p-testing"]["spec"]["parentRefs"][0]["name"] == "gw"


def test_offline_render_has_no_owner_and_is_deterministic() -> None:
    doc = pool_doc()
    a = render.render(ModelPool.from_dict(doc), owner=False)
    b = render.render(ModelPool.from_dict(copy.deepcopy(doc)), owner=False)
    assert a == b
    assert all("ownerReferences" not in o["metadata"] for o in a)


@pytest.mark.parametrize(("uri", "path", "volume_key"), [
    ("hf://org/model", "org/model", "emptyDir"),
    ("pvc://claim/a/b", "/models/a/b", "persistentVolumeClaim"),
    ("oci://reg.io/models/m:1", "/models", "image"),
])
def test_artifacts_map_to_volume_and_args(uri: str, path: str, volume_key: str) -> None:
    pool = ModelPool.from_dict(pool_doc(model={"name": "m", "uri": uri}))
    dep = render.deployment(pool, "decode", pool.spec.roles.decode, None)
    eng = engine_of(dep)
    assert eng["args"][eng["args"].index("--model") + 1] == path
    vol = dep["spec"]["template"]["spec"]["volumes"][0]
    assert volume_key in vol
    assert eng["volumeMounts"][0]["mountPath"] == "/models"
    if volume_key == "persistentVolumeClaim":
        assert vol[volume_key] == {"claimName": "claim", "readOnly": True}


def test_hf_revision_and_bad_uris() -> None:
    assert artifacts.resolve("hf://org/m@abc").revision == "abc"
    for bad in ("s3://b/m", "hf://justname", "pvc://", "model"):
        with pytest.raises(ValidationError):
            ModelPool.from_dict(pool_doc(model={"name": "m", "uri": bad}))


def test_engines() -> None:
    sim = ModelPool.from_dict(pool_doc(engine="sim", port=8100,
                                       model={"name": "sim-m", "uri": "hf://x/y"}))
    eng = engine_of(render.deployment(sim, "decode", sim.spec.roles.decode, None))
    assert eng["command"] == ["epp", "sim"]
    assert eng["args"] == ["--base-ip", "0.0.0.0", "--port", "8100", "--model", "sim-m"]
    assert eng["ports"] == [{"name": "http", "containerPort": 8100, "protocol": "TCP"}]
    sg = ModelPool.from_dict(pool_doc(engine="sglang", roles={
        "prefill": {"replicas": 1}, "decode": {"parallelism": {"tensor": 4}}}))
    eng = engine_of(render.deployment(sg, "prefill", sg.spec.roles.decode, None))
    assert eng["args"][-2:] == ["--disaggregation-mode", "prefill"]
    assert eng["args"][eng["args"].index("--tp"):][:2] == ["--tp", "4"]


def test_merge_semantics() -> None:
    base: dict[str, Any] = {
        "containers": [
            {"name": "engine", "image": "a", "args": ["x"],
             "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
             "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}},
            {"name": "side", "image": "s"},
        ],
        "tolerations": [{"key": "k"}],
    }
    over = {
        "containers": [
            {"name": "engine", "image": "", "args": ["y", "z"],
             "env": [{"name": "A", "value": ""}, {"name": "B", "value": "3"},
                     {"name": "C", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}],
             "resources": {"limits": {"memory": "2Gi"}, "requests": {}}},
            {"name": "new", "image": "n", "command": []},
        ],
        "tolerations": [],
    }
    out = merge(base, over)
    eng = out["containers"][0]
    assert eng["image"] == "a"  # empty = not overridden
    assert eng["args"] == ["y", "z"]  # scalar lists replace
    assert eng["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "3"},
                          {"name": "C", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]
    assert eng["resources"] == {"limits": {"cpu": "1", "memory": "2Gi"}}  # per key
    assert [c["name"] for c in out["containers"]] == ["engine", "side", "new"]
    assert out["containers"][2] == {"name": "new", "image": "n"}  # appended, empties dropped
    assert out["tolerations"] == [{"key": "k"}]
    assert base["containers"][0]["image"] == "a" and len(base["containers"]) == 2  # untouched


def test_template_layers_and_variables() -> None:
    tpl = template.parse("""
apiVersion: apps/v1
kind: Deployment
metadata: {labels: {team: t}}
spec:
  strategy: {type: Recreate}
  replicas: 99
  template:
    metadata: {annotations: {port: "${PORT}"}, labels: {business: hacked, extra: "${ROLE}"}}
    spec:
      containers:
        - name: engine
          image: custom:${ENGINE}
          env: [{name: P, value: "${MODEL_PATH}"}, {name: Q, value: "$${NOT_A_VAR}"}]
          resources: {limits: {gpu: "${TENSOR_PARALLEL}", cpu: "4"}}
          ports: [{name: http, containerPort: "${PORT}"}]
        - {name: sidecar, image: side:1, args: ["--pod=$(POD_NAME)"]}
""")
    pool = ModelPool.from_dict(pool_doc(roles={"decode": {
        "replicas": 2, "parallelism": {"tensor": 2},
        "acceleratorSelector": {"gpu": "h100"},
        "resources": {"limits": {"cpu": "8"}},
        "containers": [{"name": "engine", "env": [{"name": "P", "value": ""}]}],
    }}, template={"configMapName": "cm"}))
    dep = render.deployment(pool, "decode", pool.spec.roles.decode, tpl)
    podspec = dep["spec"]["template"]["spec"]
    eng = engine_of(dep)
    assert dep["spec"]["replicas"] == 2  # the pool wins over the template
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert dep["metadata"]["labels"]["team"] == "t"
    meta = dep["spec"]["template"]["metadata"]
    assert meta["labels"]["business"] == "unassigned" and meta["labels"]["extra"] == "decode"
    assert meta["annotations"]["port"] == "8000"  # annotations stay strings
    assert eng["image"] == "custom:vllm"
    assert {"name": "P", "value": "org/m"} in eng["env"]  # empty override kept template value
    assert {"name": "Q", "value": "${NOT_A_VAR}"} in eng["env"]
    assert eng["resources"]["limits"] == {"gpu": "2", "cpu": "8"}
    assert eng["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert podspec["nodeSelector"] == {"gpu": "h100"}
    assert podspec["containers"][1]["args"] == ["--pod=$(POD_NAME)"]
    with pytest.raises(template.TemplateError, match="TYPO"):
        render.deployment(pool, "decode", pool.spec.roles.decode,
                          template.parse("spec: {template: {spec: {x: '${TYPO}'}}}"))


def test_decouple_scaling_leaves_replicas_out() -> None:
    pool = ModelPool.from_dict(pool_doc(decoupleScaling=True))
    dep = render.deployment(pool, "decode", pool.spec.roles.decode, None)
    assert "replicas" not in dep["spec"]


def test_business_alias_gets_own_inference_model() -> None:
    pool = ModelPool.from_dict(pool_doc(businesses=[
        {"name": "prod", "criticality": "Critical", "match": {"path": "/a"}},
        {"name": "test", "criticality": "Sheddable", "modelName": "m-test",
         "match": {"path": "/b"}},
    ]))
    ims = {m["spec"]["modelName"]: m for m in render.inference_models(pool)}
    assert ims["org/m"]["spec"]["criticality"] == "Critical"
    assert ims["m-test"]["spec"]["criticality"] == "Sheddable"
    assert ims["m-test"]["spec"]["targetModels"] == [{"name": "org/m", "weight": 100}]


@pytest.mark.parametrize("businesses", [
    [{"name": "a", "criticality": "Critical", "match": {"path": "/a"}},
     {"name": "b", "criticality": "Sheddable", "match": {"path": "/b"}}],
    [{"name": "a"}, {"name": "b"}],  # same route match
    [{"name": "a", "match": {"path": "/a"}}, {"name": "a", "match": {"path": "/b"}}],
    [{"name": "unassigned"}],
    [{"name": "a", "replicas": 1, "share": 1}],
])
def test_bad_specs_rejected(businesses: list[dict[str, Any]]) -> None:
    with pytest.raises(ValidationError):
        ModelPool.from_dict(pool_doc(businesses=businesses))


def test_model_label_value() -> None:
    assert model_label_value("meta-llama/Llama-3.1-8B-Instruct") == \
        "meta-llama--Llama-3.1-8B-Instruct"
    v = model_label_value("x" * 100 + "/y")
    assert len(v) == 63


def _crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / "manifests/crds/modelpool.yaml").read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _jsonschema(s: Any) -> Any:
    if isinstance(s, dict):
        out = {k: _jsonschema(v) for k, v in s.items()
               if not k.startswith("x-kubernetes-") and k != "nullable"}
        if s.get("nullable") and "type" in out:
            out["type"] = [out["type"], "null"]
        if s.get("x-kubernetes-int-or-string"):
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return out
    if isinstance(s, list):
        return [_jsonschema(v) for v in s]
    return s


def test_crd_is_generated_from_model_and_structural() -> None:
    text = (ROOT / "manifests/crds/modelpool.yaml").read_text()
    hint = "run: python -m epp.reconcile.crdgen > manifests/crds/modelpool.yaml"
    assert text == crdgen.dump(), hint

    def walk(node: dict[str, Any], path: str) -> None:
        assert "$ref" not in node and "anyOf" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        for k, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.{k}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}{{}}")
    walk(_crd_schema(), "")


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_samples_validate_and_render(sample: pathlib.Path) -> None:
    docs = load_documents([str(sample)])
    validator = jsonschema.Draft7Validator(_jsonschema(_crd_schema()))
    pools = [d for d in docs if d["kind"] == "ModelPool"]
    assert pools
    for d in pools:
        assert not list(validator.iter_errors(d))
    objs = render_documents(docs)
    assert by_kind(objs, "InferencePool") and by_kind(objs, "Deployment")


def test_crd_rejects_what_the_model_rejects() -> None:
    validator = jsonschema.Draft7Validator(_jsonschema(_crd_schema()))
    bad = pool_doc(engine="tgi")
    assert list(validator.iter_errors(bad))
    bad = pool_doc(roles={"decode": {"replicas": -1}})
    assert list(validator.iter_errors(bad))


def test_render_cli(capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    from epp.cli import main
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(pool_doc(template={"configMapName": "missing"})))
    assert main(["render", "-f", str(f)]) == 2  # a user error
    assert "missing" in capsys.readouterr().err
    sample = ROOT / "manifests/samples/modelpool-sim.yaml"
    assert main(["render", "-f", str(sample)]) == 0
    objs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [o["kind"] for o in objs].count("HTTPRoute") == 2

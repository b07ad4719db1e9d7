"""What `make kind-demo` applies, checked without kind (no container engine here): the demo
ModelPool renders with its EPP config accepted, the Envoy gateway config passes `envoy --mode
validate`, and the script lints (tests/unit/test_makefile.py runs shellcheck on hack/).
tests/kube/test_reconciler_chart.py has the API server accept the same objects."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from epp.devstack.envoy import envoy_binary
from epp.reconcile.cli_render import render_documents
from hack.kind import objects


def test_demo_pool_renders_with_a_single_destination_config() -> None:
    doc = objects.pool("epp-demo")
    objs = render_documents([doc])
    dep = next(o for o in objs if o["kind"] == "Deployment"
               and o["metadata"]["name"] == "sim-llama-epp")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    text = next(a for a in args if a.startswith("--config-text="))
    assert "maxNumOfEndpoints: 1" in text
    assert all(o["metadata"]["namespace"] == "epp-demo" for o in objs)


def test_gateway_config_is_valid_envoy(tmp_path: Path) -> None:
    docs = objects.gateway("epp-demo")
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["envoy.yaml"]
    cfg = yaml.safe_load(config)
    epp = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "epp")
    assert epp["type"] == "STRICT_DNS"
    addr = epp["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert addr["socket_address"] == {"address": "sim-llama-epp.epp-demo.svc.cluster.local",
                                      "port_value": 9002}
    path = tmp_path / "envoy.yaml"
    path.write_text(config)
    res = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]

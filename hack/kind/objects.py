"""Objects `make kind-demo` applies besides the CRDs and the reconciler chart.

    python -m hack.kind.objects pool    --namespace epp-demo   # the sample ModelPool
    python -m hack.kind.objects gateway --namespace epp-demo   # an Envoy gateway for it

The pool is manifests/samples/modelpool-sim.yaml in the demo namespace, its EPP configured
(spec.epp.config) to name one destination per request, which is what Envoy's ORIGINAL_DST
cluster routes on. The gateway is the project's Envoy config (epp/devstack/envoy.py): header
strip, ext_proc to the pool's EPP Service by DNS, ORIGINAL_DST to the pod the EPP picked;
a ConfigMap, a Deployment and a Service `gateway` on port 8080. No Gateway API controller is
involved, so clients send `x-business` themselves (the pool's HTTPRoutes would set it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from epp.devstack.envoy import EnvoyOptions, render_envoy_config
from epp.scheduling.config import DEFAULT_CONFIG

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "manifests" / "samples" / "modelpool-sim.yaml"
ENVOY_IMAGE = "envoyproxy/envoy:v1.34-latest"
GATEWAY_PORT = 8080


def pool(namespace: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"]["namespace"] = namespace
    config = yaml.safe_load(DEFAULT_CONFIG)
    for plugin in config["plugins"]:
        if plugin["type"] == "max-score-picker":
            plugin["parameters"] = {"maxNumOfEndpoints": 1}
    doc["spec"]["epp"]["config"] = config
    return doc


def envoy_config(epp_host: str, epp_port: int = 9002) -> dict[str, Any]:
    cfg = render_envoy_config(EnvoyOptions(
        listen_port=GATEWAY_PORT, listen_address="0.0.0.0", admin_port=9901,
        epp_host=epp_host, epp_ports=[epp_port], upstream="original_dst"))
    for cluster in cfg["static_resources"]["clusters"]:
        if cluster["name"] == "epp":  # a Service name, not an IP
            cluster["type"] = "STRICT_DNS"
            cluster["dns_lookup_family"] = "V4_ONLY"
    return cfg


def gateway(namespace: str, image: str = ENVOY_IMAGE) -> list[dict[str, Any]]:
    pool_doc = pool(namespace)
    svc = pool_doc["spec"]["epp"].get("serviceName") or f"{pool_doc['metadata']['name']}-epp"
    host = f"{svc}.{namespace}.svc.cluster.local"
    labels = {"app.kubernetes.io/name": "envoy-gateway", "app.kubernetes.io/part-of": "epp-demo"}
    meta = {"namespace": namespace, "labels": labels}
    config = yaml.safe_dump(envoy_config(host, pool_doc["spec"]["epp"].get("port", 9002)),
                            sort_keys=False)
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "envoy-gateway", **meta},
         "data": {"envoy.yaml": config}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "envoy-gateway", **meta},
         "spec": {
             "replicas": 1,
             "selector": {"matchLabels": labels},
             "template": {
                 "metadata": {"labels": labels},
                 "spec": {
                     "containers": [{
                         "name": "envoy", "image": image,
                         "args": ["-c", "/etc/envoy/envoy.yaml", "--log-level", "warn"],
                         "ports": [{"name": "http", "containerPort": GATEWAY_PORT,
                                    "protocol": "TCP"}],
                         "readinessProbe": {"httpGet": {"path": "/ready", "port": 9901}},
                         "volumeMounts": [{"name": "config", "mountPath": "/etc/envoy"}],
                     }],
                     "volumes": [{"name": "config",
                                  "configMap": {"name": "envoy-gateway"}}],
                 },
             },
         }},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "gateway", **meta},
         "spec": {"selector": labels,
                  "ports": [{"name": "http", "port": GATEWAY_PORT, "targetPort": "http",
                             "protocol": "TCP"}]}},
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["pool", "gateway"])
    p.add_argument("--namespace", default="epp-demo", help="demo namespace (default: %(default)s)")
    p.add_argument("--envoy-image", default=ENVOY_IMAGE, help="(default: %(default)s)")
    a = p.parse_args(argv)
    docs = [pool(a.namespace)] if a.what == "pool" else gateway(a.namespace, a.envoy_image)
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

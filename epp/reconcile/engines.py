"""Per-engine container defaults: image, command, arguments, probes, P/D flags.

The result is the *lowest* layer of a role's pod spec: the base template and the
ModelPool's per-role overrides are merged on top of it (see `merge.py`).
"""

from __future__ import annotations

import json
from typing import Any

from epp import IMAGE
from epp.api.modelpool import ModelPool, RoleSpec
from epp.reconcile.artifacts import Artifact

ENGINE_CONTAINER = "engine"
DEFAULT_IMAGES = {
    "vllm": "vllm/vllm-openai:latest",
    "sglang": "lmsysorg/sglang:latest",
    "sim": IMAGE,
}


def engine_args(
    pool: ModelPool, role: str, spec: RoleSpec, art: Artifact, port: int | None = None
) -> list[str]:
    """`port`: where the engine listens (default the pool's port; decode pods of a P/D pool
    move it behind the sidecar)."""
    s = pool.spec
    port = port or s.port
    tp = spec.parallelism.tensor
    dp = spec.parallelism.data
    pd = pool.spec.roles.prefill is not None
    if s.engine == "vllm":
        args = ["--model", art.model_path, "--served-model-name", s.model.name,
                "--port", str(port)]
        if art.revision:
            args += ["--revision", art.revision]
        if tp > 1:
            args += ["--tensor-parallel-size", str(tp)]
        if dp > 1:
            args += ["--data-parallel-size", str(dp)]
        if pd:
            kv = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
            args += ["--kv-transfer-config", json.dumps(kv, separators=(",", ":"))]
    elif s.engine == "sglang":
        args = ["--model-path", art.model_path, "--served-model-name", s.model.name,
                "--host", "0.0.0.0", "--port", str(port)]
        if art.revision:
            args += ["--revision", art.revision]
        if tp > 1:
            args += ["--tp", str(tp)]
        if dp > 1:
            args += ["--dp", str(dp)]
        if pd:
            args += ["--disaggregation-mode", role]
    else:  # sim: the project's simulator, `epp sim`, on every interface of the pod
        args = ["--base-ip", "0.0.0.0", "--port", str(port), "--model", s.model.name]
        if pd:
            args += ["--role", role]
    return args + list(spec.extra_args)


def engine_container(
    pool: ModelPool, role: str, spec: RoleSpec, art: Artifact, port: int | None = None
) -> dict[str, Any]:
    s = pool.spec
    port = port or s.port
    container: dict[str, Any] = {
        "name": ENGINE_CONTAINER,
        "image": s.image or DEFAULT_IMAGES[s.engine],
        "args": engine_args(pool, role, spec, art, port),
        "ports": [{"name": "http" if port == s.port else "engine", "containerPort": port,
                   "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": port},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
    }
    if s.engine == "sglang":
        container["command"] = ["python3", "-m", "sglang.launch_server"]
    elif s.engine == "sim":
        container["command"] = ["epp", "sim"]
    return container

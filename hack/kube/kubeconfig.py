"""Just enough kubeconfig parsing for the test tooling (token or client-cert auth).

The fake kubelet and the cluster helper talk to the API server with plain aiohttp/urllib;
they need the server URL, the credentials and a TLS context, nothing more.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class KubeAccess:
    server: str
    token: str | None
    ssl_context: ssl.SSLContext

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def _named(items: list[dict[str, Any]], name: str, key: str) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return dict(item.get(key) or {})
    raise ValueError(f"kubeconfig: no {key} named {name!r}")


def _data_file(data_b64: str, tmpdir: str, name: str) -> str:
    path = os.path.join(tmpdir, name)
    Path(path).write_bytes(base64.b64decode(data_b64))
    return path


def load_kubeconfig(path: str | os.PathLike[str]) -> KubeAccess:
    doc = yaml.safe_load(Path(path).read_text())
    ctx = _named(doc["contexts"], doc["current-context"], "context")
    cluster = _named(doc["clusters"], ctx["cluster"], "cluster")
    user = _named(doc.get("users") or [], ctx["user"], "user") if ctx.get("user") else {}
    tmpdir = tempfile.mkdtemp(prefix="kubecfg-")
    sslctx = ssl.create_default_context()
    if cluster.get("insecure-skip-tls-verify"):
        sslctx.check_hostname = False
        sslctx.verify_mode = ssl.CERT_NONE
    elif cluster.get("certificate-authority-data"):
        sslctx.load_verify_locations(
            _data_file(cluster["certificate-authority-data"], tmpdir, "ca.crt")
        )
    elif cluster.get("certificate-authority"):
        sslctx.load_verify_locations(cluster["certificate-authority"])
    cert = user.get("client-certificate") or (
        _data_file(user["client-certificate-data"], tmpdir, "client.crt")
        if user.get("client-certificate-data")
        else None
    )
    key = user.get("client-key") or (
        _data_file(user["client-key-data"], tmpdir, "client.key")
        if user.get("client-key-data")
        else None
    )
    if cert and key:
        sslctx.load_cert_chain(cert, key)
    return KubeAccess(server=str(cluster["server"]).rstrip("/"), token=user.get("token"),
                      ssl_context=sslctx)

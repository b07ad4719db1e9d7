"""The one place a Kubernetes API client is built (the EPP's pool watch, the reconciler)."""

from __future__ import annotations

import os

from kubernetes_asyncio import client, config
from kubernetes_asyncio.config.config_exception import ConfigException

from epp.api.errors import UserError


class KubeConfigError(UserError):
    """No usable cluster credentials: a user error, reported in one line."""


def _default_kubeconfig() -> str:
    return os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser(
        "~/.kube/config"
    )


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise KubeConfigError(f"kubeconfig {path}: no such file")


async def load_api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """Kubeconfig file if given; else in-cluster config; else the default kubeconfig
    (`$KUBECONFIG` or ~/.kube/config). Raises `KubeConfigError` when none is usable."""
    cfg = client.Configuration()
    if not kubeconfig:
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            return client.ApiClient(configuration=cfg)
        except ConfigException:
            kubeconfig = _default_kubeconfig()
            if not os.path.isfile(kubeconfig):  # noqa: ASYNC240 (a stat, once at start-up)
                raise KubeConfigError(
                    f"no Kubernetes credentials: not running in a cluster and no kubeconfig "
                    f"at {kubeconfig} (pass --kubeconfig)"
                ) from None
    _check_file(kubeconfig)
    try:
        await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    except (ConfigException, ValueError, TypeError, KeyError, AttributeError) as e:
        raise KubeConfigError(f"kubeconfig {kubeconfig}: not usable ({e})") from None
    return client.ApiClient(configuration=cfg)

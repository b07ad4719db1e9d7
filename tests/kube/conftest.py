"""Fixtures for tests against a real Kubernetes API server.

By default the session starts the project's own cluster (hack/kube/cluster.py): etcd,
kube-apiserver, kube-controller-manager and kube-scheduler v1.20.2 on 127.0.0.1 (free
ports, temp dir), a fake kubelet with two Nodes that marks scheduled pods Running/Ready with
distinct loopback IPs (127.0.0.10, .11, ...), and the CRDs of manifests/crds/. The binaries
are built once (`make kube-build`, cached in ~/.cache/kube-apiserver-1.20.2); if they are
missing and cannot be built, the kube tests are skipped.

`KUBECONFIG_E2E=/path/to/kubeconfig` runs the same tests against an existing cluster (kind,
a real cluster) instead: nothing is started or stopped, the CRDs are applied, each test
works in its own namespace. Tests that need to restart the API server or compact etcd
skip there; pods need real images there (tests that rely on the fake kubelet's loopback
IPs skip too).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from hack.kube import cluster as kc

T = TypeVar("T")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kube)


def wait_for(cond: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll `cond` until it returns a truthy value (returned) or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kc.Cluster]:
    e2e = os.environ.get("KUBECONFIG_E2E")
    if e2e:
        cluster = kc.external(Path(e2e))
        cluster.install_crds()
        yield cluster
        return
    if not kc.build(log=tmp_path_factory.getbasetemp() / "kube-build.log"):
        pytest.skip("kube-apiserver v1.20.2 binaries are missing and could not be built "
                    "(run `make kube-build` as root on Debian bookworm, or set KUBECONFIG_E2E)")
    workdir = tmp_path_factory.mktemp("kube")
    cluster = kc.start(workdir)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def managed_cluster(kube_cluster: kc.Cluster) -> kc.Cluster:
    """The session cluster, only when we own its processes (restart / compaction tests)."""
    if not kube_cluster.managed:
        pytest.skip("needs the project's own test cluster (not KUBECONFIG_E2E)")
    return kube_cluster


@pytest.fixture
def kube_ns(kube_cluster: kc.Cluster) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (without waiting)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    kube_cluster.create_namespace(name)
    yield name
    kube_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)

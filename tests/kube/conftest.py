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

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from epp.reconcile.apply import ApplySettings
from epp.reconcile.controller import Controller
from epp.reconcile.kube import Kube
from hack.kube import cluster as kc
from tests.kube.helpers import ensure_httproute_crd

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


# ---- end-to-end tests (ModelPool, reconcile, P/D): pod processes, an API client, the reconciler
@pytest.fixture(scope="module")
def cluster(kube_cluster: kc.Cluster) -> kc.Cluster:
    """The project's own cluster, whose fake kubelet runs pod processes on loopback IPs,
    with the HTTPRoute CRD installed."""
    if not kube_cluster.managed:
        pytest.skip("needs the fake kubelet's pod processes (not KUBECONFIG_E2E)")
    ensure_httproute_crd(kube_cluster)
    return kube_cluster


@pytest.fixture
async def kube(cluster: kc.Cluster) -> AsyncIterator[Kube]:
    k = await Kube.connect(str(cluster.kubeconfig))
    yield k
    await k.close()


@pytest.fixture
async def controller(kube: Kube, kube_ns: str) -> AsyncIterator[Controller]:
    """`epp reconcile` for the test namespace, in-process."""
    ctl = Controller(kube, kube_ns, ApplySettings(), resync=5.0)
    stop = asyncio.Event()
    task = asyncio.create_task(ctl.run(stop))
    yield ctl
    stop.set()
    await task

"""KubeSource against a real API server: pods, Deployments, labels, models, restarts, 410."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from epp.datalayer.datastore import Criticality, Datastore, TargetModel
from epp.datalayer.endpoint import Endpoint
from epp.datalayer.kube_source import KubeSource
from hack.kube.cluster import Cluster
from tests.kube.helpers import (
    by_name,
    deployment_yaml,
    kubectl,
    model_yaml,
    open_gate,
    pod_yaml,
    pool_yaml,
    until,
)

LABELS = {"app": "sim", "model": "llama", "business": "prod", "role": "decode"}
SourceFactory = Callable[..., Awaitable[tuple[Datastore, KubeSource]]]


@pytest.fixture
async def make_source(kube_cluster: Cluster) -> AsyncIterator[SourceFactory]:
    sources: list[KubeSource] = []

    async def make(ns: str, pool: str = "pool", cluster: Cluster | None = None,
                   **kw: object) -> tuple[Datastore, KubeSource]:
        ds = Datastore()
        kubeconfig = str((cluster or kube_cluster).kubeconfig)
        src = KubeSource(ds, pool, ns, kubeconfig=kubeconfig, **kw)  # type: ignore[arg-type]
        sources.append(src)
        await src.start()
        assert await ds.wait_synced(15), "kube source did not sync"
        return ds, src

    yield make
    for src in sources:
        await src.stop()


async def test_not_synced_until_pool_exists(kube_cluster: Cluster, kube_ns: str,
                                            make_source: SourceFactory) -> None:
    ds = Datastore()
    src = KubeSource(ds, "pool", kube_ns, kubeconfig=str(kube_cluster.kubeconfig))
    await src.start()
    try:
        assert not await ds.wait_synced(1.0)
        await kubectl(kube_cluster, "apply", "-f", "-",
                      input=pool_yaml("pool", kube_ns, {"app": "sim"}, [8000]))
        assert await ds.wait_synced(10)
    finally:
        await src.stop()


async def test_pods_appear_become_ready_and_disappear(
    kube_cluster: Cluster, kube_ns: str, make_source: SourceFactory
) -> None:
    await kubectl(kube_cluster, "apply", "-f", "-",
                  input=pool_yaml("pool", kube_ns, {"app": "sim"}, [8000, 8001])
                  + "---" + pod_yaml("other", kube_ns, {"app": "other"}))
    ds, _ = await make_source(kube_ns)
    assert ds.endpoints() == ()  # the unrelated pod is not in the pool

    await kubectl(kube_cluster, "apply", "-f", "-",
                  input=pod_yaml("a", kube_ns, LABELS)
                  + "---" + pod_yaml("b", kube_ns, {**LABELS, "role": "prefill"}, gated=True))

    def both() -> dict[str, list[Endpoint]] | None:
        m = by_name(ds)
        return m if len(m.get("a", [])) == 2 and len(m.get("b", [])) == 2 else None

    eps = await until(both, what="2 pods x 2 ports")
    a, b = eps["a"], eps["b"]
    assert {e.port for e in a} == {8000, 8001}
    assert all(e.ready and e.model == "llama" and e.business == "prod" for e in a)
    assert all(not e.ready and e.role == "prefill" for e in b)  # not ready, but kept
    assert a[0].address != b[0].address and a[0].address.startswith("127.0.")

    # b becomes ready; the same Endpoint objects are updated in place.
    b0 = ds.get(b[0].key)
    await open_gate(kube_cluster, kube_ns, "b")
    await until(lambda: all(e.ready for e in by_name(ds)["b"]), what="b ready")
    assert ds.get(b[0].key) is b0

    # Deletion: not ready while terminating, gone once the pod object is gone.
    await kubectl(kube_cluster, "delete", "pod/a", "-n", kube_ns, "--wait=false")
    await until(lambda: "a" not in by_name(ds), what="a removed")
    assert {e.name for e in ds.endpoints()} == {"b"}


async def test_deployment_scale_up_and_down(kube_cluster: Cluster, kube_ns: str,
                                            make_source: SourceFactory) -> None:
    await kubectl(kube_cluster, "apply", "-f", "-",
                  input=pool_yaml("pool", kube_ns, {"app": "sim"}, [8000])
                  + "---" + deployment_yaml("sim", kube_ns, 1, LABELS))
    ds, _ = await make_source(kube_ns)

    def ready_count() -> int:
        return sum(1 for e in ds.endpoints() if e.ready)

    await until(lambda: ready_count() == 1, timeout=20, what="1 ready endpoint")
    await kubectl(kube_cluster, "scale", "deployment/sim", "-n", kube_ns, "--replicas=4")
    await until(lambda: ready_count() == 4 and len(ds.endpoints()) == 4, timeout=20,
                what="4 ready endpoints")
    assert len({e.address for e in ds.endpoints()}) == 4
    await kubectl(kube_cluster, "scale", "deployment/sim", "-n", kube_ns, "--replicas=2")
    await until(lambda: len(ds.endpoints()) == 2, timeout=20, what="2 endpoints")
    assert ready_count() == 2


async def test_relabel_business_moves_endpoint_within_1s(
    kube_cluster: Cluster, kube_ns: str, make_source: SourceFactory
) -> None:
    await kubectl(kube_cluster, "apply", "-f", "-",
                  input=pool_yaml("pool", kube_ns, {"app": "sim"}, [8000])
                  + "---" + pod_yaml("a", kube_ns, LABELS))
    ds, _ = await make_source(kube_ns)
    await until(lambda: [e for e in ds.endpoints() if e.ready], what="ready endpoint")
    ep = ds.endpoints()[0]
    delays = []
    for i in range(10):
        target = f"biz-{i}"
        t0 = time.monotonic()
        await kubectl(kube_cluster, "label", "pod/a", "-n", kube_ns, "--overwrite",
                      f"business={target}")
        await until(lambda t=target: ep.business == t, timeout=1.0,  # type: ignore[misc]
                    interval=0.002, what=f"business={target}")
        delays.append(time.monotonic() - t0)
    assert ds.get(ep.key) is ep  # live state kept across label moves
    print(f"label->datastore incl. kubectl: p50={statistics.median(delays) * 1000:.0f}ms "
          f"max={max(delays) * 1000:.0f}ms")
    # Removing the label puts the pod back to "unassigned"; llm-d's role key is honoured.
    await kubectl(kube_cluster, "label", "pod/a", "-n", kube_ns, "business-", "role-",
                  "llm-d.ai/role=prefill")
    await until(lambda: ep.business == "unassigned" and ep.role == "prefill",
                what="unassigned prefill")


async def test_selector_and_target_port_changes_resync(
    kube_cluster: Cluster, kube_ns: str, make_source: SourceFactory
) -> None:
    await kubectl(kube_cluster, "apply", "-f", "-",
                  input=pool_yaml("pool", kube_ns, {"app": "sim"}, [8000])
                  + "---" + pod_yaml("a", kube_ns, LABELS)
                  + "---" + pod_yaml("z", kube_ns, {**LABELS, "app": "other"}))
    ds, _ = await make_source(kube_ns)
    await until(lambda: {e.name for e in ds.endpoints()} == {"a"}, what="a only")
    await kubectl(kube_cluster, "apply", "-f", "-",
                  input=pool_yaml("pool", kube_ns, {"app": "sim"}, [8000, 9000]))
    await until(lambda: sorted(e.port for e in ds.endpoints()) == [8000, 9000],
                what="two ports")
    await kubectl(kube_cluster, "apply", "-f", "-",
                  input=pool_yaml("pool", kube_ns, {"app": "other"}, [9000]))
    await until(lambda: [(e.name, e.port) for e in ds.endpoints()] == [("z", 9000)],
                what="selector switched to z")
    await kubectl(kube_cluster, "delete", "inferencepool/pool", "-n", kube_ns)
    await until(lambda: ds.endpoints() == (), what="pool deleted -> no endpoints")


async def test_inference_models_and_objectives(
    kube_cluster: Cluster, kube_ns: str, make_source: SourceFactory
) -> None:
    await kubectl(kube_cluster, "apply", "-f", "-",
                  input=pool_yaml("pool", kube_ns, {"app": "sim"}, [8000])
                  + "---" + model_yaml("chat", kube_ns, "llama", "pool", "Critical",
                                       [("llama-a", 3), ("llama-b", 1)])
                  + "---" + model_yaml("elsewhere", kube_ns, "gpt", "other-pool"))
    ds, _ = await make_source(kube_ns)
    info = ds.model("llama")
    assert info is not None and info.criticality is Criticality.CRITICAL
    assert info.target_models == (TargetModel("llama-a", 3), TargetModel("llama-b", 1))
    assert info.source == f"{kube_ns}/chat"
    assert ds.model("gpt") is None  # other pool

    await kubectl(kube_cluster, "apply", "-f", "-",
                  input=model_yaml("chat", kube_ns, "llama", "pool", "Sheddable"))
    await until(lambda: (m := ds.model("llama")) and m.criticality is Criticality.SHEDDABLE
                and m.target_models == (), what="update")
    # A younger InferenceModel with the same modelName loses to the older one.
    time.sleep(1.1)  # creationTimestamp has 1 s resolution
    await kubectl(kube_cluster, "apply", "-f", "-",
                  input=model_yaml("chat-2", kube_ns, "llama", "pool", "Critical"))
    await kubectl(kube_cluster, "apply", "-f", "-",
                  input=model_yaml("mistral", kube_ns, "mistral", "pool"))
    await until(lambda: ds.model("mistral"), what="mistral")
    llama = ds.model("llama")
    assert llama is not None and llama.source == f"{kube_ns}/chat"
    await kubectl(kube_cluster, "delete", "inferencemodel/chat", "-n", kube_ns)
    await until(lambda: (m := ds.model("llama")) and m.source == f"{kube_ns}/chat-2",
                what="chat-2 takes over")
    await kubectl(kube_cluster, "delete", "inferencemodel/chat-2", "-n", kube_ns)
    await until(lambda: ds.model("llama") is None, what="llama gone")

    await kubectl(kube_cluster, "apply", "-f", "-", input=f"""
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {{name: batch, namespace: {kube_ns}}}
spec: {{priority: -1, poolRef: {{name: pool}}}}
""")
    await until(lambda: (o := ds.objective("batch")) and o.priority == -1, what="objective")
    await kubectl(kube_cluster, "delete", "inferenceobjective/batch", "-n", kube_ns)
    await until(lambda: ds.objective("batch") is None, what="objective removed")


def src_keys(ds: Datastore) -> list[str]:
    return [m.source for m in ds.models().values()]


async def test_watch_survives_apiserver_restart(
    managed_cluster: Cluster, kube_ns: str, make_source: SourceFactory
) -> None:
    await kubectl(managed_cluster, "apply", "-f", "-",
                  input=pool_yaml("pool", kube_ns, {"app": "sim"}, [8000])
                  + "---" + pod_yaml("a", kube_ns, LABELS))
    ds, src = await make_source(kube_ns, backoff_max=0.5)
    await until(lambda: [e for e in ds.endpoints() if e.ready], what="ready")
    ep = ds.endpoints()[0]
    await kubectl_restart(managed_cluster)
    await kubectl(managed_cluster, "label", "pod/a", "-n", kube_ns, "--overwrite",
                  "business=after-restart")
    await until(lambda: ep.business == "after-restart", timeout=10, what="label after restart")
    assert ds.get(ep.key) is ep
    stats = src.stats()
    assert stats["pods"].errors + stats["pods"].gone + stats["pods"].watches >= 2


async def kubectl_restart(cluster: Cluster) -> None:
    await asyncio.to_thread(cluster.restart_apiserver, 0.5)


async def test_relist_after_410_gone(managed_cluster: Cluster, kube_ns: str,
                                     make_source: SourceFactory) -> None:
    """The source watches through a second apiserver without a pod watch cache; while that
    one is down, pods change and etcd is compacted: the resumed watch gets 410 Gone and
    the source relists, ending up with the right view."""
    await kubectl(managed_cluster, "apply", "-f", "-",
                  input=pool_yaml("pool", kube_ns, {"app": "sim"}, [8000])
                  + "---" + pod_yaml("a", kube_ns, LABELS)
                  + "---" + pod_yaml("b", kube_ns, LABELS))
    side = await asyncio.to_thread(managed_cluster.second_apiserver, "nocache",
                                   ["--watch-cache-sizes=pods#0"])
    try:
        ds, src = await make_source(kube_ns, cluster=side, backoff_max=0.3)
        await until(lambda: len([e for e in ds.endpoints() if e.ready]) == 2, what="2 ready")
        await asyncio.to_thread(side.stop_apiserver)
        await kubectl(managed_cluster, "delete", "pod/a", "-n", kube_ns, "--wait=false")
        await kubectl(managed_cluster, "label", "pod/b", "-n", kube_ns, "--overwrite",
                      "business=moved")
        await kubectl(managed_cluster, "apply", "-f", "-", input=pod_yaml("c", kube_ns, LABELS))
        await until(lambda: "pod/a" not in managed_cluster.kubectl(
            "get", "pods", "-n", kube_ns, "-o", "name"), timeout=10, what="a deleted")
        await asyncio.to_thread(managed_cluster.compact_etcd)
        await asyncio.to_thread(side.start_apiserver)
        await until(lambda: {(e.name, e.business) for e in ds.endpoints()}
                    == {("b", "moved"), ("c", "prod")}, timeout=15, what="relisted view")
        assert src.stats()["pods"].gone >= 1
    finally:
        await asyncio.to_thread(side.stop_apiserver)

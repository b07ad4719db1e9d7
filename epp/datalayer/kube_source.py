"""Kubernetes endpoint source: one InferencePool, its pods, its InferenceModels/Objectives.

    src = KubeSource(datastore, "pool", "ns", kubeconfig=None, label_keys=LabelKeys())
    await src.start()      # returns at once; datastore.wait_synced() tells when it is ready
    ...
    await src.stop()

What it watches (all in the pool's namespace, each with kube_watch.Reflector):
- the `InferencePool` (inference.networking.k8s.io/v1) named `pool_name`;
- the pods matching the pool's `selector.matchLabels`: one `Endpoint` per pod IP and target
  port, labelled from the pod's `model` / `business` / `role` (or `llm-d.ai/role`) /
  `engine-type` labels (keys configurable), readiness per `kube_pods.pod_ready`;
  a selector change restarts the pod watch (full resync), a targetPorts change rebuilds
  the endpoints from the pod cache;
- `InferenceModel`s (inference.networking.x-k8s.io/v1alpha2) whose poolRef names the pool
  -> `ModelInfo` (criticality, weighted target models, creation time for oldest-wins);
- `InferenceObjective`s whose poolRef names the pool -> `Objective` priorities.
Absent CRDs (InferenceModel / InferenceObjective not installed) count as empty.

The datastore is marked synced (`SOURCE_NAME`) once the pool, its pods, the models and
the objectives have each been listed once. Needs RBAC: get/list/watch on pods,
inferencepools, inferencemodels, inferenceobjectives in the namespace (manifests/rbac/).

Debug: python -m epp.datalayer.kube_source --kubeconfig K --pool-name P --pool-namespace NS --dump
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, cast

import pydantic
from kubernetes_asyncio import client

from epp.api import inference as api
from epp.datalayer.datastore import Criticality, Datastore, ModelInfo, Objective, TargetModel
from epp.datalayer.endpoint import Endpoint
from epp.datalayer.endpoint_tasks import cancel_and_wait
from epp.datalayer.kube_client import load_api_client
from epp.datalayer.kube_pods import Pod, pod_endpoints, pod_key, slim_pod
from epp.datalayer.kube_watch import ListCall, Obj, Reflector, WatchStats
from epp.datalayer.labels import DEFAULT_LABEL_KEYS, LabelKeys

log = logging.getLogger(__name__)

SOURCE_NAME = "kube"
_PARTS = ("pool", "pods", "models", "objectives")


def _guarded(fn: Callable[..., None]) -> Callable[..., None]:
    """A malformed object must not kill a watch: log it and carry on."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("kube source: cannot handle %s", fn.__name__)

    return wrapper


class KubeSource:
    def __init__(
        self,
        datastore: Datastore,
        pool_name: str,
        namespace: str,
        *,
        kubeconfig: str | None = None,
        label_keys: LabelKeys = DEFAULT_LABEL_KEYS,
        api_client: client.ApiClient | None = None,
        watch_timeout: int = 300,
        backoff_max: float = 5.0,
        endpoints_only: bool = False,
    ) -> None:
        """`endpoints_only`: watch the pool and its pods only, no InferenceModels or
        InferenceObjectives (the P/D sidecar's allow-list; needs no RBAC for them)."""
        self.ds = datastore
        self.endpoints_only = endpoints_only
        self.pool_name = pool_name
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self.keys = label_keys
        self.watch_timeout = watch_timeout
        self.backoff_max = backoff_max
        self._api = api_client
        self._own_api = api_client is None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.reflectors: dict[str, Reflector] = {}
        self._done: dict[str, bool] = dict.fromkeys(_PARTS, False)
        self._marked = False
        # pool state
        self.pool: api.InferencePool | None = None
        self._selector: str | None = None
        self._ports: tuple[int, ...] = ()
        self._pod_gen = 0
        # pod cache: pod key -> pod, and which endpoint keys each pod owns
        self._pods: dict[str, Pod] = {}
        self._pod_eps: dict[str, set[str]] = {}
        self._ep_owner: dict[str, str] = {}
        self._objectives: dict[str, Objective] = {}
        self._model_keys: set[str] = set()

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        if self._api is None:
            self._api = await load_api_client(self.kubeconfig)
        self.ds.register_source(SOURCE_NAME)
        custom = client.CustomObjectsApi(self._api)
        self._start(Reflector(
            "inferencepool",
            functools.partial(custom.list_namespaced_custom_object, api.POOL_GROUP,
                              api.POOL_VERSION, self.namespace, api.POOL_PLURAL,
                              field_selector=f"metadata.name={self.pool_name}"),
            self._on_pool_list, self._on_pool_event, **self._reflector_opts()))
        if self.endpoints_only:
            self._done["models"] = self._done["objectives"] = True
            return
        self._start(Reflector(
            "inferencemodels",
            functools.partial(custom.list_namespaced_custom_object, api.X_GROUP, api.X_VERSION,
                              self.namespace, api.MODEL_PLURAL),
            self._on_model_list, self._on_model_event, optional=True, **self._reflector_opts()))
        self._start(Reflector(
            "inferenceobjectives",
            functools.partial(custom.list_namespaced_custom_object, api.X_GROUP, api.X_VERSION,
                              self.namespace, api.OBJECTIVE_PLURAL),
            self._on_objective_list, self._on_objective_event, optional=True,
            **self._reflector_opts()))

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await cancel_and_wait(tasks)
        if self._own_api and self._api is not None:
            await self._api.close()
            self._api = None

    def stats(self) -> dict[str, WatchStats]:
        return {name: r.stats for name, r in self.reflectors.items()}

    def _reflector_opts(self) -> dict[str, Any]:
        return {"watch_timeout": self.watch_timeout, "backoff_max": self.backoff_max}

    def _start(self, reflector: Reflector) -> None:
        old = self._tasks.pop(reflector.name, None)
        if old is not None:
            old.cancel()
        self.reflectors[reflector.name] = reflector
        self._tasks[reflector.name] = asyncio.create_task(reflector.run(),
                                                          name=f"kube-{reflector.name}")

    def _part_done(self, part: str) -> None:
        self._done[part] = True
        if not self._marked and all(self._done.values()):
            self._marked = True
            self.ds.mark_synced(SOURCE_NAME)
            log.info("kube source synced: pool %s/%s, %d endpoints", self.namespace,
                     self.pool_name, len(self._ep_owner))

    # ---- pool --------------------------------------------------------------------------
    @_guarded
    def _on_pool_list(self, items: list[Obj]) -> None:
        mine = [o for o in items if (o.get("metadata") or {}).get("name") == self.pool_name]
        self._set_pool(mine[0] if mine else None)

    @_guarded
    def _on_pool_event(self, etype: str, obj: Obj) -> None:
        self._set_pool(None if etype == "DELETED" else obj)

    def _set_pool(self, obj: Obj | None) -> None:
        if obj is None:
            if self.pool is not None or not self._done["pool"]:
                log.warning("InferencePool %s/%s not found: no endpoints", self.namespace,
                            self.pool_name)
            self.pool = None
            self._set_selector(None, ())
            return
        try:
            pool = api.InferencePool.model_validate(obj)
        except pydantic.ValidationError as exc:
            log.error("InferencePool %s/%s is invalid, keeping the last good one: %s",
                      self.namespace, self.pool_name, exc)
            return
        self.pool = pool
        self._done["pool"] = True
        self._set_selector(pool.spec.selector.selector_string(), pool.spec.ports)

    def _set_selector(self, selector: str | None, ports: tuple[int, ...]) -> None:
        if selector != self._selector:
            self._selector, self._ports = selector, ports
            self._restart_pods()
        elif ports != self._ports:
            self._ports = ports
            log.info("InferencePool %s/%s target ports now %s", self.namespace, self.pool_name,
                     ports)
            self._rebuild_endpoints()

    def _restart_pods(self) -> None:
        self._pod_gen += 1
        task = self._tasks.pop("pods", None)
        if task is not None:
            task.cancel()
        self.reflectors.pop("pods", None)
        self._pods.clear()
        if self._selector is None:
            self._rebuild_endpoints()
            return
        log.info("watching pods of %s/%s with selector %s", self.namespace, self.pool_name,
                 self._selector)
        gen = self._pod_gen
        core = client.CoreV1Api(self._api)
        self._start(Reflector(
            "pods",
            cast(ListCall, functools.partial(core.list_namespaced_pod, self.namespace,
                                             label_selector=self._selector)),
            functools.partial(self._on_pod_list, gen),
            functools.partial(self._on_pod_event, gen),
            **self._reflector_opts()))

    # ---- pods --------------------------------------------------------------------------
    @_guarded
    def _on_pod_list(self, gen: int, items: list[Obj]) -> None:
        if gen != self._pod_gen:
            return
        self._pods = {pod_key(p): slim_pod(p) for p in items}
        self._rebuild_endpoints()
        if self._done["pool"]:
            self._part_done("pods")

    @_guarded
    def _on_pod_event(self, gen: int, etype: str, pod: Obj) -> None:
        if gen != self._pod_gen:
            return
        key = pod_key(pod)
        if etype == "DELETED":
            self._pods.pop(key, None)
            self._drop_pod_endpoints(key, set())
            return
        self._pods[key] = slim_pod(pod)
        eps = pod_endpoints(pod, self._ports, self.keys)
        self._drop_pod_endpoints(key, {ep.key for ep in eps})
        for ep in eps:
            self.ds.upsert_endpoint(SOURCE_NAME, ep)
            self._ep_owner[ep.key] = key
        self._pod_eps[key] = {ep.key for ep in eps}

    def _drop_pod_endpoints(self, key: str, keep: set[str]) -> None:
        for ep_key in self._pod_eps.pop(key, set()) - keep:
            if self._ep_owner.get(ep_key) == key:
                del self._ep_owner[ep_key]
                self.ds.remove_endpoint(ep_key)

    def _rebuild_endpoints(self) -> None:
        eps: list[Endpoint] = []
        self._pod_eps.clear()
        self._ep_owner.clear()
        for key, pod in self._pods.items():
            pod_eps = pod_endpoints(pod, self._ports, self.keys)
            self._pod_eps[key] = {ep.key for ep in pod_eps}
            for ep in pod_eps:
                self._ep_owner[ep.key] = key
            eps.extend(pod_eps)
        self.ds.replace_endpoints(SOURCE_NAME, eps)

    # ---- InferenceModels ------------------------------------------------------------------
    def _model_info(self, obj: Obj) -> ModelInfo | None:
        """The ModelInfo of an InferenceModel of this pool, else None."""
        try:
            model = api.InferenceModel.model_validate(obj)
        except pydantic.ValidationError as exc:
            name = (obj.get("metadata") or {}).get("name")
            log.error("InferenceModel %s/%s ignored: %s", self.namespace, name, exc)
            return None
        if not model.spec.pool_ref.refers_to(self.pool_name):
            return None
        return ModelInfo(
            name=model.spec.model_name,
            criticality=Criticality(model.spec.criticality or "Standard"),
            target_models=tuple(
                TargetModel(t.name, 1 if t.weight is None else t.weight)
                for t in model.spec.target_models
            ),
            source=model.metadata.key,
            created=model.metadata.created,
        )

    @_guarded
    def _on_model_list(self, items: list[Obj]) -> None:
        infos = [i for i in map(self._model_info, items) if i is not None]
        self._model_keys = {i.source for i in infos}
        self.ds.replace_models(SOURCE_NAME, infos)
        self._part_done("models")

    @_guarded
    def _on_model_event(self, etype: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        key = f"{meta.get('namespace', self.namespace)}/{meta.get('name', '')}"
        info = None if etype == "DELETED" else self._model_info(obj)
        if info is None:
            if key in self._model_keys:
                self._model_keys.discard(key)
                self.ds.remove_model(SOURCE_NAME, key)
            return
        self._model_keys.add(key)
        self.ds.upsert_model(SOURCE_NAME, info)

    # ---- InferenceObjectives -------------------------------------------------------------
    def _objective(self, obj: Obj) -> Objective | None:
        try:
            objective = api.InferenceObjective.model_validate(obj)
        except pydantic.ValidationError as exc:
            name = (obj.get("metadata") or {}).get("name")
            log.error("InferenceObjective %s/%s ignored: %s", self.namespace, name, exc)
            return None
        if not objective.spec.pool_ref.refers_to(self.pool_name):
            return None
        return Objective(objective.metadata.name, objective.spec.priority or 0)

    @_guarded
    def _on_objective_list(self, items: list[Obj]) -> None:
        self._objectives = {o.name: o for o in map(self._objective, items) if o is not None}
        self.ds.replace_objectives(self._objectives.values())
        self._part_done("objectives")

    @_guarded
    def _on_objective_event(self, etype: str, obj: Obj) -> None:
        name = str((obj.get("metadata") or {}).get("name", ""))
        objective = None if etype == "DELETED" else self._objective(obj)
        if objective is None:
            if self._objectives.pop(name, None) is None:
                return
        else:
            self._objectives[name] = objective
        self.ds.replace_objectives(self._objectives.values())


# ---- debugging CLI ---------------------------------------------------------------------------
def _dump(ds: Datastore) -> dict[str, Any]:
    return {
        "synced": ds.synced,
        "endpoints": [
            {"key": ep.key, "name": ep.name, "model": ep.model, "business": ep.business,
             "role": ep.role, "engine": ep.engine, "ready": ep.ready}
            for ep in sorted(ds.endpoints(), key=lambda e: e.key)
        ],
        "models": {name: {"criticality": m.criticality.value, "source": m.source,
                          "targetModels": [asdict(t) for t in m.target_models]}
                   for name, m in sorted(ds.models().items())},
    }


async def _main(args: argparse.Namespace) -> int:
    ds = Datastore()
    src = KubeSource(ds, args.pool_name, args.pool_namespace, kubeconfig=args.kubeconfig)
    await src.start()
    try:
        if not await ds.wait_synced(args.timeout):
            print(json.dumps({"synced": False, "error": "not synced before timeout"}))
            return 1
        print(json.dumps(_dump(ds), indent=2))
        if args.dump:
            return 0
        last = ds.version
        while True:  # --follow: print the view after every change
            await asyncio.sleep(0.2)
            if ds.version != last:
                last = ds.version
                print(json.dumps(_dump(ds)), flush=True)
    finally:
        await src.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description="Print what the EPP sees of an InferencePool")
    ap.add_argument("--kubeconfig")
    ap.add_argument("--pool-name", required=True)
    ap.add_argument("--pool-namespace", default="default")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--dump", action="store_true", help="print once and exit (default)")
    mode.add_argument("--follow", action="store_true", help="print after every change")
    ap.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args()
    if not args.follow:
        args.dump = True
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(asyncio.run(_main(args)))


if __name__ == "__main__":
    main()

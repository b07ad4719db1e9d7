"""`epp pool status POOL | assign POD BUSINESS | distribute POOL production=3,testing=1`.

- `status`: pods in the pool, assigned / unassigned, distribution per role and business.
- `assign`: relabel one pod (one atomic patch) and pin it there, so the reconciler builds the
  declared distribution around it (`--unpin` gives it back to the reconciler).
- `distribute`: write the distribution into the ModelPool (`name=N` exact pods per role,
  `name=N%` or `name=N*` a share of the rest) and converge the pods now; the reconciler keeps
  it as pods come and go. The ModelPool write is a JSON patch guarded by `test` operations.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from typing import Any

from pydantic import ValidationError

from epp.api.errors import one_line, validation_message
from epp.api.modelpool import UNASSIGNED, ModelPool
from epp.reconcile import distribution
from epp.reconcile.apply import FIELD_MANAGER
from epp.reconcile.assignment import assign, list_pool_pods, pod_info
from epp.reconcile.kube import ApiError, Kube
from epp.reconcile.reconciler import distribute, pool_path

POOL_MANAGER = "epp-pool"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", default="",
                        help="kubeconfig path (default: in-cluster, then $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("-n", "--namespace", default="default", help="namespace of the pool")
    sub = parser.add_subparsers(dest="action", required=True)
    st = sub.add_parser("status", help="pods per business and role")
    st.add_argument("pool", help="ModelPool name")
    a = sub.add_parser("assign", help="move one pod to a business (pinned)")
    a.add_argument("pod", help="pod name")
    a.add_argument("business", help="business to move the pod to (or unassigned)")
    a.add_argument("--unpin", action="store_true", help="relabel without pinning")
    d = sub.add_parser("distribute", help="declare and apply a business distribution")
    d.add_argument("pool", help="ModelPool name")
    d.add_argument("spec", help="production=3,testing=1 (pods per role) or production=75%%,...")


def parse_distribution(text: str) -> dict[str, tuple[str, int]]:
    """`a=3,b=25%` -> {a: (replicas, 3), b: (share, 25)}."""
    out: dict[str, tuple[str, int]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"bad distribution item {part!r}; expected name=N or name=N%")
        value = value.strip()
        kind = "share" if value.endswith(("%", "*")) else "replicas"
        try:
            n = int(value.rstrip("%*"))
        except ValueError:
            raise ValueError(f"bad number in {part!r}") from None
        if n < 0:
            raise ValueError(f"negative value in {part!r}")
        out[name.strip()] = (kind, n)
    if not out:
        raise ValueError("empty distribution")
    return out


def distribution_patch(raw: dict[str, Any], wanted: dict[str, tuple[str, int]]) -> list[Any]:
    businesses = (raw.get("spec") or {}).get("businesses") or []
    names = [b.get("name") for b in businesses]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ValueError(f"businesses {unknown} are not declared in the ModelPool (each needs "
                         "its route); add them to spec.businesses first")
    ops: list[Any] = [{"op": "test", "path": "/metadata/resourceVersion",
                       "value": raw["metadata"]["resourceVersion"]}]
    for i, b in enumerate(businesses):
        if b["name"] not in wanted:
            continue
        kind, n = wanted[b["name"]]
        other = "share" if kind == "replicas" else "replicas"
        ops.append({"op": "test", "path": f"/spec/businesses/{i}/name", "value": b["name"]})
        ops.append({"op": "add", "path": f"/spec/businesses/{i}/{kind}", "value": n})
        if other in b:
            ops.append({"op": "remove", "path": f"/spec/businesses/{i}/{other}"})
    return ops


def format_status(pool: str, pods: list[dict[str, Any]]) -> str:
    infos = [pod_info(p) for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    total = len(infos)
    unassigned = sum(1 for p in infos if p.business == UNASSIGNED)
    lines = [f"pool {pool}: {total} pods, {total - unassigned} assigned, "
             f"{unassigned} unassigned, {sum(p.ready for p in infos)} ready"]
    per = Counter((p.business, p.role) for p in infos)
    ready = Counter((p.business, p.role) for p in infos if p.ready)
    lines.append(f"{'BUSINESS':<16}{'ROLE':<10}{'PODS':>6}{'READY':>7}")
    for (business, role), n in sorted(per.items()):
        lines.append(f"{business:<16}{role:<10}{n:>6}{ready[(business, role)]:>7}")
    for p in sorted(infos, key=lambda p: p.name):
        flags = " pinned" if p.pinned else ""
        lines.append(f"  {p.name} {p.role} {p.business}{' ready' if p.ready else ''}{flags}")
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> int:
    kube = await Kube.connect(args.kubeconfig)
    ns = args.namespace
    try:
        if args.action == "status":
            if await kube.get_or_none(pool_path(ns, args.pool)) is None:
                print(f"ModelPool {ns}/{args.pool} not found", file=sys.stderr)
                return 1
            print(format_status(args.pool, await list_pool_pods(kube, ns, args.pool)))
            return 0
        if args.action == "assign":
            move = await assign(kube, ns, args.pod, args.business, POOL_MANAGER,
                                pin=not args.unpin)
            print(f"pod {move.pod}: {move.source} -> {move.target}")
            return 0
        wanted = parse_distribution(args.spec)
        for _ in range(5):  # optimistic concurrency on the ModelPool
            raw = await kube.get(pool_path(ns, args.pool))
            try:
                await kube.json_patch(pool_path(ns, args.pool),
                                      distribution_patch(raw, wanted), POOL_MANAGER)
                break
            except ApiError as e:
                if e.status not in (409, 422):
                    raise
        else:
            raise ValueError("ModelPool kept changing; try again")
        pool = ModelPool.from_dict(await kube.get(pool_path(ns, args.pool)))
        moved, pods = await distribute(kube, pool, FIELD_MANAGER)
        print(f"moved {moved} pods")
        left = distribution.plan([pod_info(p) for p in pods], pool.spec.businesses)
        print(format_status(args.pool, pods))
        return 0 if not left else 1
    except ValidationError as e:
        print(f"epp pool {args.action}: error: {validation_message(e)}", file=sys.stderr)
        return 2
    except ValueError as e:  # a bad distribution spec, business or pod name
        print(f"epp pool {args.action}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except ApiError as e:
        print(f"epp pool {args.action}: {one_line(e)}", file=sys.stderr)
        return 1
    finally:
        await kube.close()


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))

"""`epp render -f modelpool.yaml [-f template-configmap.yaml]`: print a pool's objects as YAML.

Offline and deterministic (GitOps): the same objects `epp reconcile` applies, without
ownerReferences (there is no ModelPool uid offline) unless `--owner-uid` is given.
A base template comes from a ConfigMap among the input documents, or from `--template`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml
from pydantic import ValidationError

from epp.api.modelpool import KIND, ModelPool
from epp.reconcile import render, template


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", action="append", required=True,
                        help="YAML file with ModelPool(s) and template ConfigMap(s); - = stdin")
    parser.add_argument("--template", default="",
                        help="a Deployment template file used when the pool names a ConfigMap "
                             "that is not among the inputs")
    parser.add_argument("--owner-uid", default="",
                        help="add ownerReferences to a ModelPool with this uid")
    parser.add_argument("-n", "--namespace", default="",
                        help="namespace for pools that do not set one")


def load_documents(paths: list[str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in paths:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        docs += [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    return docs


def render_documents(
    docs: list[dict[str, Any]], template_file: str = "", owner_uid: str = "", namespace: str = ""
) -> list[dict[str, Any]]:
    """Render every ModelPool among `docs`. Raises ValueError with a readable message."""
    configmaps = {
        (d.get("metadata") or {}).get("name", ""): d for d in docs if d.get("kind") == "ConfigMap"
    }
    out: list[dict[str, Any]] = []
    pools = [d for d in docs if d.get("kind") == KIND]
    if not pools:
        raise ValueError("no ModelPool in the input")
    for doc in pools:
        meta = doc.setdefault("metadata", {})
        if namespace and not meta.get("namespace"):
            meta["namespace"] = namespace
        if owner_uid:
            meta["uid"] = owner_uid
        try:
            pool = ModelPool.from_dict(doc)
        except ValidationError as e:
            raise ValueError(f"ModelPool {meta.get('name', '?')}: {e}") from e
        base = None
        ref = pool.spec.template
        if ref is not None:
            if ref.config_map_name in configmaps:
                base = template.from_configmap(configmaps[ref.config_map_name], ref.key)
            elif template_file:
                with open(template_file, encoding="utf-8") as f:
                    base = template.parse(f.read())
            else:
                raise ValueError(
                    f"ModelPool {pool.name}: template ConfigMap {ref.config_map_name!r} is not "
                    "among the inputs; add it with -f or pass --template"
                )
        out += render.render(pool, base, owner=bool(owner_uid))
    return out


def run(args: argparse.Namespace) -> int:
    try:
        objs = render_documents(
            load_documents(args.filename), args.template, args.owner_uid, args.namespace
        )
    except (OSError, ValueError) as e:
        print(f"epp render: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(objs, sort_keys=False, width=120))
    return 0

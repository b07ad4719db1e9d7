"""`epp render -f modelpool.yaml [-f template-configmap.yaml]`: print a pool's objects as YAML.

Offline and deterministic (GitOps): the same objects `epp reconcile` applies, without
ownerReferences (there is no ModelPool uid offline) unless `--owner-uid` is given.
A base template comes from a ConfigMap among the input documents, or from `--template`.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Any

import yaml
from pydantic import ValidationError

from epp import IMAGE
from epp.api.errors import UserError, one_line, validation_message
from epp.api.modelpool import API_VERSION, KIND, ModelPool
from epp.reconcile import render, render_epp, template


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
    parser.add_argument("--epp-image", default=IMAGE,
                        help="image of the pools' EPP (a ModelPool's spec.epp.image wins)")
    parser.add_argument("--pdb-api", default="policy/v1", choices=["policy/v1", "policy/v1beta1"],
                        help="PodDisruptionBudget API (policy/v1beta1 below Kubernetes 1.21)")


class RenderInputError(UserError):
    """The input is not something `epp render` can render."""


def load_documents(paths: list[str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in paths:
        try:
            if path == "-":
                text = sys.stdin.read()
            else:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            loaded = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
        except OSError as e:
            raise RenderInputError(f"{path}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise RenderInputError(f"{path}: invalid YAML: {one_line(e)}") from None
        for d in loaded:
            d.setdefault("__source__", path)
        docs += loaded
    return docs


def _not_a_modelpool(docs: list[dict[str, Any]], sources: list[str]) -> str:
    """Why there is nothing to render: what the input holds instead, and what would work."""
    sources = sorted(set(sources)) or ["the input"]
    kinds = Counter(str(d.get("kind", "?")) for d in docs)
    held = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in kinds.items()) or "no objects"
    hint = ""
    if kinds.keys() & {"InferencePool", "Deployment", "InferenceModel", "Service"}:
        hint = " (plain manifests: apply them with kubectl as they are)"
    return (f"no ModelPool in {', '.join(sources)}: it holds {held}{hint}. epp render takes "
            f"a ModelPool ({API_VERSION}), e.g. manifests/samples/modelpool-sim.yaml")


def render_documents(
    docs: list[dict[str, Any]], template_file: str = "", owner_uid: str = "", namespace: str = "",
    epp: render_epp.EppOptions | None = None,
) -> list[dict[str, Any]]:
    """Render every ModelPool among `docs`. Raises ValueError with a readable message."""
    configmaps = {
        (d.get("metadata") or {}).get("name", ""): d for d in docs if d.get("kind") == "ConfigMap"
    }
    out: list[dict[str, Any]] = []
    sources = [str(d.pop("__source__", "the input")) for d in docs]
    pools = [d for d in docs if d.get("kind") == KIND]
    if not pools:
        raise RenderInputError(_not_a_modelpool(docs, sources))
    for doc in pools:
        meta = doc.setdefault("metadata", {})
        if namespace and not meta.get("namespace"):
            meta["namespace"] = namespace
        if owner_uid:
            meta["uid"] = owner_uid
        try:
            pool = ModelPool.from_dict(doc)
        except ValidationError as e:
            raise RenderInputError(
                f"ModelPool {meta.get('name', '?')}: {validation_message(e)}"
            ) from None
        base = None
        ref = pool.spec.template
        if ref is not None:
            if ref.config_map_name in configmaps:
                base = template.from_configmap(configmaps[ref.config_map_name], ref.key)
            elif template_file:
                try:
                    with open(template_file, encoding="utf-8") as f:
                        base = template.parse(f.read())
                except OSError as e:
                    raise RenderInputError(f"--template {template_file}: {e.strerror}") from None
            else:
                raise RenderInputError(
                    f"ModelPool {pool.name}: template ConfigMap {ref.config_map_name!r} is not "
                    "among the inputs; add it with -f or pass --template"
                )
        try:
            out += render.render(pool, base, owner=bool(owner_uid), epp=epp)
        except ValueError as e:  # a spec the models accept but rendering cannot satisfy
            raise RenderInputError(f"ModelPool {pool.name}: {e}") from None
    return out


def run(args: argparse.Namespace) -> int:
    objs = render_documents(
        load_documents(args.filename), args.template, args.owner_uid, args.namespace,
        render_epp.EppOptions(image=args.epp_image, pdb_api=args.pdb_api),
    )
    sys.stdout.write(yaml.safe_dump_all(objs, sort_keys=False, width=120))
    return 0

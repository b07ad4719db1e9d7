"""Import directions between the product's layers: extproc → requestcontrol → scheduling →
datalayer, nothing upward; `epp/api` (resource models and protocol names) imports no other
layer; the product never imports the benchmarks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

EPP = Path(__file__).resolve().parents[2] / "epp"

# Each layer and the epp packages it must never import.
FORBIDDEN: dict[str, set[str]] = {
    "datalayer": {
        "scheduling",
        "requestcontrol",
        "extproc",
        "serve",
        "sidecar",
        "reconcile",
        "sync",
    },
    "scheduling": {"requestcontrol", "extproc", "serve", "sidecar", "reconcile", "sync"},
    # replica state sync: below request control (its lifecycle hook imports the ledger)
    "sync": {"requestcontrol", "extproc", "serve", "sidecar", "reconcile", "replicas"},
    "requestcontrol": {"extproc", "serve", "sidecar", "reconcile"},
    "extproc": {"serve", "sidecar", "reconcile"},
    "api": {
        "datalayer",
        "scheduling",
        "requestcontrol",
        "extproc",
        "serve",
        "sidecar",
        "reconcile",
        "sim",
        "devstack",
        "observability",
    },
    "sim": {"datalayer", "scheduling", "requestcontrol", "extproc", "serve", "reconcile"},
    # Shared by the EPP and the simulator: depends on neither.
    "tokenization": {
        "datalayer",
        "scheduling",
        "requestcontrol",
        "extproc",
        "serve",
        "sidecar",
        "reconcile",
        "sim",
        "devstack",
        "observability",
    },
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    mods: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
    return mods


def layer_files(layer: str) -> list[Path]:
    return sorted((EPP / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_down(layer: str) -> None:
    files = layer_files(layer)
    assert files, f"no files in epp/{layer}"
    bad = []
    for f in files:
        for mod in imported_modules(f):
            parts = mod.split(".")
            if parts[0] == "epp" and len(parts) > 1 and parts[1] in FORBIDDEN[layer]:
                bad.append(f"{f.relative_to(EPP.parent)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_product_never_imports_bench() -> None:
    bad = [
        f"{f.relative_to(EPP.parent)} imports {mod}"
        for f in sorted(EPP.rglob("*.py"))
        for mod in imported_modules(f)
        if mod == "bench" or mod.startswith("bench.")
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("from epp.requestcontrol.director import Director\nimport bench.run\n")
    assert {"epp.requestcontrol.director", "bench.run"} <= imported_modules(f)

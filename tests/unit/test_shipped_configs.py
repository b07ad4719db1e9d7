"""What an operator installs is what the project tests and benchmarks. The Helm chart's
`config`, the plain manifests' ConfigMap and the precise-prefix sample parse to the same
EndpointPickerConfig as `DEFAULT_CONFIG` (and bench's `precise.yaml`). They drifted once:
the default moved to the delay-cost scorer while kubectl and Helm installs kept the old
scorer mix that issue 9 measured losing. The gateway examples are the generator's output."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from epp.devstack import envoy
from epp.scheduling.config import DEFAULT_CONFIG, EndpointPickerConfig, parse_config

REPO = Path(__file__).resolve().parents[2]


def configmap_config(path: Path) -> EndpointPickerConfig:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "epp-config.yaml" in d["data"]]
    return parse_config(cm["data"]["epp-config.yaml"])


def test_the_chart_and_the_manifests_ship_the_built_in_default() -> None:
    default = parse_config(DEFAULT_CONFIG)
    values = yaml.safe_load((REPO / "charts/epp/values.yaml").read_text())
    assert parse_config(values["config"]) == default
    assert configmap_config(REPO / "manifests/epp/epp.yaml") == default


def test_the_precise_sample_is_the_benchmarked_precise_config() -> None:
    benchmarked = parse_config((REPO / "bench/scenarios/epp_configs/precise.yaml").read_text())
    assert configmap_config(REPO / "manifests/samples/epp-precise-prefix.yaml") == benchmarked


@pytest.mark.parametrize(
    ("manifest", "args"),
    [("envoy-standalone.yaml", []), ("envoy-replicas.yaml", ["--epp-ports", "9002,9012"])],
)
def test_the_gateway_examples_are_what_the_generator_prints(
    manifest: str, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """manifests/gateway/ says it is `python -m epp.devstack.envoy [args]`'s output (plus a
    comment header): a change to the generator must regenerate it."""
    envoy.main(args)
    shipped = (REPO / "manifests/gateway" / manifest).read_text()
    assert yaml.safe_load(shipped) == yaml.safe_load(capsys.readouterr().out)

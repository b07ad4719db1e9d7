"""The sample files a newcomer is pointed at load as they are."""

from __future__ import annotations

from pathlib import Path

from epp.datalayer.static_source import parse_endpoints_yaml

REPO = Path(__file__).resolve().parents[2]


def test_endpoints_sample_is_valid() -> None:
    specs = parse_endpoints_yaml((REPO / "docs/endpoints.sample.yaml").read_bytes())
    assert len(specs) == 3
    assert {dict(s.labels)["business"] for s in specs} == {"production", "testing"}


def test_samples_readme_describes_every_sample() -> None:
    readme = (REPO / "manifests/samples/README.md").read_text()
    for f in sorted((REPO / "manifests/samples").glob("*.yaml")):
        assert f"`{f.name}`" in readme, f.name

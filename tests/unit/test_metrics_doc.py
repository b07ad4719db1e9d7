"""docs/observability.md names every metric the EPP, its sync layer and the P/D sidecar
export: an operator reads the page to build dashboards and alerts, so a new metric without
a line there is a metric nobody finds."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("epp/observability/metrics.py", "epp/sync/metrics.py", "epp/sidecar/metrics.py")
METRIC_NAME = re.compile(r'"((?:epp|inference)_[a-z_]+)"')


def exported_names() -> set[str]:
    return {n for f in SOURCES for n in METRIC_NAME.findall((REPO / f).read_text())}


def test_every_exported_metric_is_documented() -> None:
    names = exported_names()
    assert len(names) > 50  # the scan still finds the metrics
    page = (REPO / "docs/observability.md").read_text()
    documented = set(re.findall(r"`((?:epp|inference)_[a-z_]+)", page))
    missing = sorted(n for n in names if n not in documented and f"{n}_total" not in documented)
    assert not missing, f"not in docs/observability.md: {missing}"

"""Router names of the harness: `epp[:variant][@replicas[xworkers][-nosync]][+access-log]`."""

from __future__ import annotations

import pytest

from bench.routers import RouterSpec


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ("epp", ("epp", "", 1, 1, True, False)),
        ("epp+access-log", ("epp", "", 1, 1, True, True)),
        ("epp:precise@2x2-nosync+access-log", ("epp", "precise", 2, 2, False, True)),
        ("vllm-router:cache_aware", ("vllm-router", "cache_aware", 1, 1, True, False)),
    ],
)
def test_names_parse_and_print_back(text: str, fields: tuple[object, ...]) -> None:
    spec = RouterSpec.parse(text)
    assert (spec.kind, spec.variant, spec.replicas, spec.workers, spec.sync,
            spec.access_log) == fields  # fmt: skip
    assert spec.name == text


@pytest.mark.parametrize("text", ["round_robin+access-log", "epp@0", "nginx"])
def test_bad_names_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        RouterSpec.parse(text)

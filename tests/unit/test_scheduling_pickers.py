"""Pickers: max-score with a random tie-break, fallbacks by score, weighted random."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytest

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.framework import Picker
from epp.scheduling.plugins.pickers import MaxScorePicker, RandomPicker, WeightedRandomPicker
from epp.scheduling.request import CycleState, InferenceRequest

REQ = InferenceRequest(request_id="r", model="m")


def eps(n: int) -> list[Endpoint]:
    return [Endpoint(f"127.0.0.{i + 1}", 8000) for i in range(n)]


def picker(cls: type[Picker], **params: Any) -> Picker:
    p: Mapping[str, Any] = params
    return cls("", p)


def keys(endpoints: list[Endpoint]) -> list[str]:
    return [e.key for e in endpoints]


def test_max_score_picks_the_best() -> None:
    e = eps(4)
    p = picker(MaxScorePicker, seed=1)
    for _ in range(20):
        assert p.pick(CycleState(), REQ, e, [0.1, 0.9, 0.5, 0.89]) == [e[1]]


def test_max_score_random_tie_break_spreads_ties() -> None:
    e = eps(4)
    p = picker(MaxScorePicker, seed=3)
    counts = Counter(p.pick(CycleState(), REQ, e, [1.0, 0.2, 1.0, 1.0])[0].key for _ in range(600))
    assert set(counts) == {e[0].key, e[2].key, e[3].key}  # never the lower score
    assert min(counts.values()) > 120  # ~200 each: not always the first of the ties


def test_max_score_fallbacks_ordered_by_score() -> None:
    e = eps(5)
    p = picker(MaxScorePicker, maxNumOfEndpoints=3, seed=1)
    got = p.pick(CycleState(), REQ, e, [0.3, 0.9, 0.1, 0.5, 0.7])
    assert keys(got) == keys([e[1], e[4], e[3]])


def test_max_score_fallbacks_more_than_endpoints() -> None:
    e = eps(2)
    p = picker(MaxScorePicker, maxNumOfEndpoints=5)
    assert keys(p.pick(CycleState(), REQ, e, [0.1, 0.2])) == keys([e[1], e[0]])


def test_max_score_multi_tie_break_is_random_too() -> None:
    e = eps(3)
    p = picker(MaxScorePicker, maxNumOfEndpoints=2, seed=5)
    firsts = Counter(p.pick(CycleState(), REQ, e, [0.5, 0.5, 0.1])[0].key for _ in range(300))
    assert set(firsts) == {e[0].key, e[1].key}
    assert min(firsts.values()) > 80
    for _ in range(20):
        assert p.pick(CycleState(), REQ, e, [0.5, 0.5, 0.1])[1].key != e[2].key


def test_max_score_count_param_validated_to_at_least_one() -> None:
    e = eps(3)
    p = picker(MaxScorePicker, maxNumOfEndpoints=0)
    assert len(p.pick(CycleState(), REQ, e, [0.1, 0.2, 0.3])) == 1
    assert p.pick(CycleState(), REQ, [], []) == []


def test_weighted_random_roughly_proportional() -> None:
    e = eps(3)
    p = picker(WeightedRandomPicker, seed=11)
    n = 6000
    counts = Counter(p.pick(CycleState(), REQ, e, [0.1, 0.3, 0.6])[0].key for _ in range(n))
    for ep_, w in zip(e, [0.1, 0.3, 0.6], strict=True):
        assert counts[ep_.key] / n == pytest.approx(w, abs=0.03)


def test_weighted_random_zero_weight_rarely_first_but_still_eligible() -> None:
    e = eps(2)
    p = picker(WeightedRandomPicker, seed=2, maxNumOfEndpoints=2)
    firsts = Counter(p.pick(CycleState(), REQ, e, [0.0, 1.0])[0].key for _ in range(500))
    assert firsts[e[1].key] == 500
    got = p.pick(CycleState(), REQ, e, [0.0, 1.0])
    assert keys(got) == keys([e[1], e[0]])  # without replacement: both returned once


def test_weighted_random_seed_is_reproducible() -> None:
    e = eps(5)
    scores = [0.2, 0.2, 0.2, 0.2, 0.2]
    a = picker(WeightedRandomPicker, seed=42)
    b = picker(WeightedRandomPicker, seed=42)
    seq_a = [a.pick(CycleState(), REQ, e, scores)[0].key for _ in range(50)]
    seq_b = [b.pick(CycleState(), REQ, e, scores)[0].key for _ in range(50)]
    assert seq_a == seq_b
    assert len(set(seq_a)) > 1


def test_random_picker_distinct_and_spread() -> None:
    e = eps(4)
    p = picker(RandomPicker, seed=9, maxNumOfEndpoints=2)
    counts: Counter[str] = Counter()
    for _ in range(400):
        got = p.pick(CycleState(), REQ, e, [0.0] * 4)
        assert len(got) == 2 and got[0] is not got[1]
        counts[got[0].key] += 1
    assert min(counts.values()) > 60


@pytest.mark.parametrize("level", [0.0, 1e-4, 0.01])
def test_weighted_random_uniform_when_all_scores_equal_and_tiny(level: float) -> None:
    """Equal (even zero or tiny) scores must still spread, not fall to the last endpoint."""
    e = eps(4)
    p = picker(WeightedRandomPicker, seed=13)
    n = 2000
    counts = Counter(p.pick(CycleState(), REQ, e, [level] * 4)[0].key for _ in range(n))
    for ep_ in e:
        assert counts[ep_.key] / n == pytest.approx(0.25, abs=0.04), counts


def test_weighted_random_proportional_for_small_scores() -> None:
    e = eps(2)
    p = picker(WeightedRandomPicker, seed=17)
    n = 4000
    counts = Counter(p.pick(CycleState(), REQ, e, [0.002, 0.006])[0].key for _ in range(n))
    assert counts[e[1].key] / n == pytest.approx(0.75, abs=0.03)


def test_max_score_fallbacks_are_the_head_of_the_full_sort() -> None:
    """Sorting only the scores at or above the count-th best gives what sorting all of them
    by (-score, random key) gave, with the generator left in the same state."""
    import random

    gen = random.Random(7)
    e = eps(200)
    for count in (2, 3, 5, 200, 300):
        p = picker(MaxScorePicker, maxNumOfEndpoints=count, seed=4)
        ref = random.Random(4)
        for _ in range(30):
            scores = [gen.choice((0.0, 0.2, 0.5, 0.9, 1.0)) for _ in e]  # ties at every level
            got = p.pick(CycleState(), REQ, e, scores)
            order = sorted(range(len(e)), key=lambda i: (-scores[i], ref.random()))
            assert keys(got) == keys([e[i] for i in order[:count]])

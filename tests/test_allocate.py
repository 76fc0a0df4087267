"""Tests for fimlora.allocate (rank allocation under a budget) and fimlora.budget (the Budget type)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fimlora.allocate import _proportional_floor, allocate, min_budget
from fimlora.budget import Budget

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Zeros and a few repeated values make ties common; the floats stay well clear of subnormals so that
# multiplying by 1e-6 keeps distinct scores distinct.
score = st.one_of(st.just(0.0), st.sampled_from([0.5, 1.0, 2.0]), st.floats(1e-3, 1e3))


@st.composite
def problems(draw: st.DrawFn) -> dict[str, Any]:
    """Random allocate() keyword arguments with a feasible total."""
    scores = draw(st.lists(score, min_size=1, max_size=60))
    n = len(scores)
    unit = draw(st.booleans())
    costs = [1] * n if unit else draw(st.lists(st.integers(1, 5000), min_size=n, max_size=n))
    k = draw(st.sampled_from([1, 2, 4, 8]))
    r_min = draw(st.integers(0, 4))
    r_max = draw(st.none() | st.integers(r_min, 64))
    lo = -(-r_min // k) * k
    assume(r_max is None or r_max // k * k >= lo)
    # Up to a mean rank of ~80, so r_max <= 64 often saturates.
    total = min_budget(costs, r_min, k) + draw(st.integers(0, 80 * sum(costs)))
    return dict(scores=scores, total=total, costs=costs, r_min=r_min, r_max=r_max, multiple_of=k,
                temperature=draw(st.floats(0, 3)))


def spent(ranks: list[int], costs: list[int]) -> int:
    return sum(r * c for r, c in zip(ranks, costs, strict=True))


def bounds(p: dict[str, Any]) -> tuple[int, float]:
    """r_min and r_max after rounding inwards to multiple_of (r_max None -> inf)."""
    k = p["multiple_of"]
    hi = math.inf if p["r_max"] is None else p["r_max"] // k * k
    return -(-p["r_min"] // k) * k, hi


@FAST
@given(problems())
def test_within_budget_and_bounds(p: dict[str, Any]) -> None:
    ranks = allocate(**p)
    lo, hi = bounds(p)
    assert len(ranks) == len(p["scores"])
    assert spent(ranks, p["costs"]) <= p["total"]
    assert all(lo <= r <= hi and r % p["multiple_of"] == 0 for r in ranks)
    assert all(type(r) is int for r in ranks)


@FAST
@given(problems())
def test_exact_with_unit_costs(p: dict[str, Any]) -> None:
    p |= dict(costs=[1] * len(p["scores"]), multiple_of=1)
    p["total"] = max(p["total"], min_budget(p["costs"], p["r_min"]))
    ranks = allocate(**p)
    assert sum(ranks) == min(p["total"], len(ranks) * bounds(p)[1])


@FAST
@given(problems())
def test_fill_stops_for_a_reason(p: dict[str, Any]) -> None:
    ranks = allocate(**p)
    k, scores, costs = p["multiple_of"], p["scores"], p["costs"]
    leftover = p["total"] - spent(ranks, costs)
    _, hi = bounds(p)
    for i, r in enumerate(ranks):
        if r + k > hi or costs[i] * k > leftover:
            continue  # this increment is ruled out by r_max or the budget
        # Otherwise it must be ruled out by monotonicity: a higher-score layer would fall below it.
        blockers = [j for j in range(len(ranks)) if scores[j] > scores[i] and ranks[j] < r + k]
        assert blockers, f"layer {i} could still take +{k} (leftover {leftover}, cost {costs[i]})"


@FAST
@given(problems())
def test_monotone_in_score(p: dict[str, Any]) -> None:
    ranks = allocate(**p)
    s = p["scores"]
    for i in range(len(s)):
        for j in range(len(s)):
            if s[i] > s[j]:
                assert ranks[i] >= ranks[j], (i, j)


@FAST
@given(problems(), st.sampled_from([1e-6, 0.37, 3.0, 1e6]))
def test_deterministic_and_scale_invariant(p: dict[str, Any], scale: float) -> None:
    ranks = allocate(**p)
    assert allocate(**p) == ranks
    assert allocate(**(p | {"scores": [x * scale for x in p["scores"]]})) == ranks


@FAST
@given(st.integers(1, 60), st.floats(0, 1e3), st.floats(0, 3))
def test_uniform_scores_give_the_mean_rank(n: int, value: float, temperature: float) -> None:
    assert allocate([value] * n, 8 * n, temperature=temperature) == [8] * n


@FAST
@given(st.lists(score, min_size=1, max_size=60), st.integers(0, 3000), st.sampled_from([1, 2, 4, 8]))
def test_temperature_zero_is_as_uniform_as_possible(scores: list[float], total: int, k: int) -> None:
    ranks = allocate(scores, total, temperature=0.0, multiple_of=k)
    assert max(ranks) - min(ranks) <= k
    assert total - sum(ranks) < k


def test_fill_spends_what_another_choice_of_increments_would() -> None:
    """Greedy by shortfall gave [6, 6, 4] (100 of 108); [6, 4, 6] is as uniform and spends 108."""
    assert allocate([1, 1, 1], 108, costs=[9, 3, 7], r_min=1, r_max=6, multiple_of=2) == [6, 4, 6]


@st.composite
def small_problems(draw: st.DrawFn) -> dict[str, Any]:
    """Problems small enough to enumerate every allocation."""
    n = draw(st.integers(1, 4))
    scores = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0, 3.7]), min_size=n, max_size=n))
    costs = draw(st.lists(st.integers(1, 12), min_size=n, max_size=n))
    k = draw(st.sampled_from([1, 2, 3]))
    r_min = draw(st.integers(0, 3))
    r_max = draw(st.integers(r_min, 9))
    assume(r_max // k * k >= -(-r_min // k) * k)
    total = min_budget(costs, r_min, k) + draw(st.integers(0, 9 * sum(costs)))
    return dict(scores=scores, total=total, costs=costs, r_min=r_min, r_max=r_max, multiple_of=k,
                temperature=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])))


def brute_force_best_spend(p: dict[str, Any], floors: list[int]) -> int:
    """The most any allocation on top of the proportional floors can spend: every combination of
    ranks in [floor, r_max] (multiples of k) that is monotone in score and within budget."""
    k, s, c = p["multiple_of"], p["scores"], p["costs"]
    _, hi = bounds(p)
    best = -1
    for ranks in itertools.product(*(range(f, int(hi) + 1, k) for f in floors)):
        if spent(list(ranks), c) > p["total"]:
            continue
        if any(s[i] > s[j] and ranks[i] < ranks[j] for i in range(len(s)) for j in range(len(s))):
            continue
        best = max(best, spent(list(ranks), c))
    return best


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_problems())
def test_fill_reaches_the_best_total_brute_force(p: dict[str, Any]) -> None:
    ranks = allocate(**p)
    floors = [int(x) for x in _proportional_floor(p["scores"], p["total"], p["costs"], p["r_min"], p["r_max"],
                                                   p["multiple_of"], p["temperature"])[-1]]
    assert all(r >= f for r, f in zip(ranks, floors, strict=True)), "the fill never goes below the proportional floor"
    assert spent(ranks, p["costs"]) == brute_force_best_spend(p, floors)


def test_exact_fill_is_fast_for_a_thousand_real_layers() -> None:
    """1000 layers of LLaMA-like widths (costs share the factor 256): the exact fill runs, and spends
    within one step of the gcd of the costs."""
    rng = np.random.default_rng(0)
    costs = [int(c) for c in rng.choice([4096 + 4096, 4096 + 1024, 4096 + 14336], size=1000)]
    scores = [float(x) for x in rng.lognormal(size=1000)]
    total = 8 * sum(costs) + 777
    ranks = allocate(scores, total, costs=costs, r_min=4, r_max=16)
    assert total - 1024 < spent(ranks, costs) <= total  # 1024 = gcd of the costs: the most one can miss


def test_proportional_example() -> None:
    assert allocate([1, 2, 3, 2], 16) == [2, 4, 6, 4]
    assert allocate([1, 2, 3, 2], 16, temperature=0) == [4, 4, 4, 4]
    # Square weights 1, 4, 9, 4 (sum 18): lam = 1 gives exactly 18.
    assert allocate([1, 2, 3, 2], 18, temperature=2) == [1, 4, 9, 4]


def test_zero_scores() -> None:
    assert allocate([0, 1], 10) == [0, 10]  # a zero score gets r_min
    assert allocate([0, 0, 0], 9) == [3, 3, 3]  # all zero: uniform


def test_clamps_and_multiples() -> None:
    # r_max=6 caps the top layer; its excess goes to the others, proportionally.
    assert allocate([10, 1, 1], 12, r_max=6) == [6, 3, 3]
    # r_min=3 rounds up to 4 and r_max=13 down to 12 with multiple_of=4.
    assert allocate([100, 1, 0], 20, r_min=3, r_max=13, multiple_of=4) == [12, 4, 4]
    # Whole budget above sum(r_max * cost): every layer at r_max.
    assert allocate([3, 2, 1], 1000, costs=[5, 6, 7], r_max=8) == [8, 8, 8]


def test_cheap_layer_absorbs_large_leftover() -> None:
    # Expensive layers cannot use the leftover, so the cheap top layer takes thousands of increments;
    costs = [1] + [5000] * 59
    ranks = allocate([1.0] + [0.5] * 59, 10**7, costs=costs)
    assert 10**7 - spent(ranks, costs) < 1  # the cost-1 layer absorbs every last parameter
    assert ranks[0] > 1000 and min(ranks[1:]) >= 33


def test_many_layers() -> None:
    n = 3000
    scores = [((i * 7919) % 1000) / 1000 for i in range(n)]
    costs = [1000 + (i * 104729) % 4000 for i in range(n)]
    ranks = allocate(scores, 8 * sum(costs), costs=costs, multiple_of=2, r_max=32)
    assert spent(ranks, costs) <= 8 * sum(costs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(scores=[], total=8), r"scores is empty.*one score per LoRA layer"),
        (dict(scores=[1, 2], total=8, costs=[1]), r"costs has 1 entries but scores has 2; pass one cost per layer"),
        (dict(scores=[1, 2], total=8, costs=[1, 0]), r"costs\[1\]=0 must be a positive integer"),
        (dict(scores=[1, 2], total=8, costs=[1, 2.5]), r"costs\[1\]=2.5 must be a positive integer"),
        (dict(scores=[1, -1.0], total=8), r"scores\[1\]=-1.0 must be finite and >= 0; fix or clamp"),
        (dict(scores=[1, 2, float("nan")], total=8), r"scores\[2\]=nan must be finite"),
        (dict(scores=[float("inf")], total=8), r"scores\[0\]=inf must be finite"),
        (dict(scores=[1], total=8, r_min=5, r_max=4), r"r_min=5 rounds up to 5 but r_max=4.*lower r_min or raise r_max"),
        (dict(scores=[1], total=8, r_min=5, r_max=7, multiple_of=4),
         r"r_min=5 rounds up to 8 but r_max=7 rounds down to 4 \(multiple_of=4\)"),
        (dict(scores=[1], total=8, r_min=-1), r"r_min=-1 must be an integer >= 0"),
        (dict(scores=[1], total=8, multiple_of=0), r"multiple_of=0 must be an integer >= 1"),
        (dict(scores=[1], total=8, temperature=-0.5), r"temperature=-0.5 must be finite and >= 0"),
        (dict(scores=[1], total=8, temperature=float("inf")), r"temperature=inf must be finite"),
        (dict(scores=[1, 2], total=9, costs=[3, 4], r_min=2),
         r"total=9 is infeasible.*needs at least 14; raise the budget to >= 14 or lower r_min"),
        (dict(scores=[1], total=-1), r"needs at least 0"),
    ],
)
def test_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        allocate(**kwargs)


def test_r_min_equal_r_max_after_rounding_is_allowed() -> None:
    assert allocate([1, 2], 100, r_min=3, r_max=7, multiple_of=4) == [4, 4]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8", Budget("mean_rank", 8.0)),
        (" mean:8 ", Budget.mean_rank(8)),
        ("mean:2.5", Budget.mean_rank(2.5)),
        ("rank:96", Budget.total_rank(96)),
        ("params:120000", Budget.params(120_000)),
        ("PARAMS:1.2e5", Budget.params(120_000)),
    ],
)
def test_budget_parse(text: str, expected: Budget) -> None:
    assert Budget.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", r"cannot parse budget ''.*'mean:R'.*'rank:N'.*'params:N'"),
        ("eight", r"cannot parse budget 'eight'; use 'R' or 'mean:R'"),
        ("ranks:96", r"cannot parse budget 'ranks:96'"),
        ("rank:", r"cannot parse budget 'rank:'"),
        ("rank:1.5", r"cannot parse budget 'rank:1.5': .*must be a whole number"),
        ("mean:0", r"cannot parse budget 'mean:0': .*must be a finite number > 0"),
        ("params:nan", r"must be a finite number > 0"),
    ],
)
def test_budget_parse_rejects(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Budget.parse(text)


def test_budget_validation() -> None:
    with pytest.raises(ValueError, match=r"Budget.kind='ranks' is unknown; use one of mean_rank, rank, params"):
        Budget("ranks", 8)
    with pytest.raises(ValueError, match=r"Budget.value=-1 must be a finite number > 0"):
        Budget.mean_rank(-1)
    with pytest.raises(ValueError, match=r"Budget.value=inf must be a finite"):
        Budget.params(math.inf)
    with pytest.raises(ValueError, match=r"Budget.value=10.5 must be a whole number for kind 'params'"):
        Budget.params(10.5)


def test_budget_resolve() -> None:
    shapes = [(64, 32), (64, 64), (128, 16)]  # costs 96, 128, 144; sum 368
    assert Budget.mean_rank(8).resolve(shapes) == (8 * 368, [96, 128, 144])
    assert Budget.mean_rank(2.5).resolve(shapes) == (920, [96, 128, 144])
    assert Budget.mean_rank(0.57).resolve([(50, 50)]) == (57, [100])  # not 56 from float error
    assert Budget.total_rank(24).resolve(shapes) == (24, [1, 1, 1])
    assert Budget.params(5000).resolve(shapes) == (5000, [96, 128, 144])
    with pytest.raises(ValueError, match=r"shapes is empty"):
        Budget.mean_rank(8).resolve([])
    with pytest.raises(ValueError, match=r"shapes\[1\]=\(0, 4\) must be two positive integers"):
        Budget.mean_rank(8).resolve([(4, 4), (0, 4)])


def test_budget_dict_round_trip() -> None:
    for budget in (Budget.mean_rank(8), Budget.total_rank(96), Budget.params(120_000)):
        assert Budget.from_dict(budget.to_dict()) == budget
    assert Budget.params(120_000.0).to_dict() == {"kind": "params", "value": 120_000}
    with pytest.raises(ValueError, match=r"budget dict lacks value"):
        Budget.from_dict({"kind": "rank"})


def test_resolved_mean_rank_matches_uniform_allocation() -> None:
    shapes = [(64, 32), (64, 64), (128, 16)]
    total, costs = Budget.mean_rank(8).resolve(shapes)
    assert allocate([1.0, 1.0, 1.0], total, costs=costs) == [8, 8, 8]

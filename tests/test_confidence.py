"""Rank-map confidence (fimlora.confidence) on synthetic calibrations whose truth is known.

Each layer l has a true per-element Fisher score f_l; a sample's squared gradient norm per
element is f_l * chi2_k / k (k degrees of freedom: the per-sample spread), so the large-sample
score is exactly f_l. Coverage is measured over repeated draws against that truth."""

from __future__ import annotations

import numpy as np
import pytest

from fimlora import AllocationConfig, Budget
from fimlora.confidence import bootstrap_scores, map_confidence, memory_bytes, resample_weights

SHAPES = [(64, 64)] * 12


def draw(truth: np.ndarray, samples: int, rng: np.random.Generator, k: int = 4) -> np.ndarray:
    return truth[None, :] * rng.chisquare(k, size=(samples, truth.size)) / k


def allocator(base_rank: int = 8):
    config = AllocationConfig(budget=Budget.mean_rank(base_rank)).resolved(base_rank)
    return lambda scores: config.allocate(scores, SHAPES)[0]


def confidence(per_sample: np.ndarray, seed: int = 0, resamples: int = 200):
    allocate = allocator()
    names = [f"layer{i}" for i in range(per_sample.shape[1])]
    zeros = np.zeros(per_sample.shape[1])
    ranks = allocate(per_sample.mean(axis=0).tolist())
    return map_confidence(names, per_sample, zeros, ranks, allocate, score="fisher", resamples=resamples, seed=seed)


def test_weights_are_bootstrap_draws_and_the_unit_weight_gives_the_plain_score():
    w = resample_weights(10, 50, seed=3)
    assert w.shape == (50, 10) and np.all(w.sum(axis=1) == 10)
    assert np.array_equal(w, resample_weights(10, 50, seed=3))  # seeded
    per_sample = np.random.default_rng(0).random((10, 3))
    mean_term = np.array([0.01, 0.0, 0.02])
    fisher = bootstrap_scores(per_sample, mean_term, "fisher", np.ones((1, 10)))[0]
    assert fisher == pytest.approx(per_sample.mean(axis=0))
    variance = bootstrap_scores(per_sample, mean_term, "variance", np.ones((1, 10)))[0]
    assert variance == pytest.approx(per_sample.mean(axis=0) - mean_term)


def test_score_intervals_cover_the_large_sample_score_at_about_their_nominal_rate():
    rng = np.random.default_rng(1)
    truth = np.geomspace(1.0, 20.0, 12)
    hits = []
    for rep in range(60):
        conf = confidence(draw(truth, 64, rng), seed=rep, resamples=200)
        hits += [iv.score_lo <= t <= iv.score_hi for iv, t in zip(conf.layers.values(), truth, strict=True)]
    coverage = float(np.mean(hits))
    print(f"score-interval coverage at level 0.9: {coverage:.3f} over {len(hits)} intervals")
    assert 0.82 <= coverage <= 0.96


def test_rank_intervals_cover_the_large_sample_ranks():
    rng = np.random.default_rng(2)
    truth = np.geomspace(1.0, 20.0, 12)
    true_ranks = allocator()(truth.tolist())
    hits = []
    for rep in range(40):
        conf = confidence(draw(truth, 128, rng), seed=rep)
        hits += [iv.rank_lo <= r <= iv.rank_hi for iv, r in zip(conf.layers.values(), true_ranks, strict=True)]
    coverage = float(np.mean(hits))
    print(f"rank-interval coverage at level 0.9: {coverage:.3f} over {len(hits)} intervals")
    assert coverage >= 0.8


def test_more_samples_make_the_map_more_stable():
    rng = np.random.default_rng(3)
    truth = np.geomspace(1.0, 20.0, 12)
    few = [confidence(draw(truth, 16, rng), seed=i).expected_rank_change for i in range(8)]
    many = [confidence(draw(truth, 512, rng), seed=i).expected_rank_change for i in range(8)]
    assert np.mean(many) < 0.5 * np.mean(few)


def test_identical_layers_are_flat_and_distinct_layers_are_not():
    rng = np.random.default_rng(4)
    flat = [confidence(draw(np.ones(12), 64, rng), seed=i).flat for i in range(40)]
    print(f"identical layers called flat in {np.mean(flat):.0%} of 40 draws")
    assert np.mean(flat) >= 0.85  # a level-0.05 test: flat ~95% of the time
    distinct = [confidence(draw(np.geomspace(1.0, 20.0, 12), 64, rng), seed=i).flat for i in range(20)]
    assert not any(distinct)


def test_confidence_round_trips_through_a_dict():
    conf = confidence(draw(np.geomspace(1.0, 5.0, 12), 32, np.random.default_rng(5)))
    assert type(conf).from_dict(conf.to_dict()) == conf
    assert conf.verdict().split(":")[0] in ("stable", "unstable", "flat")


def test_memory_is_one_scalar_per_sample_and_layer():
    # LLaMA-3-8B: 32 blocks x 7 linears; 8 batches of 8 sequences
    assert memory_bytes(224, 64) == 224 * 64 * 4


@pytest.mark.parametrize("df", [3, 11, 36, 223])
def test_chi2_tail_matches_scipy_where_the_flatness_test_decides(df):
    from scipy.stats import chi2

    from fimlora.confidence import chi2_sf

    for p in (0.2, 0.05, 0.01):
        q = chi2.isf(p, df)
        assert chi2_sf(q, df) == pytest.approx(p, abs=0.006 if df < 10 else 0.003)

"""Per-sample squared gradient norms kept beside (count, mean, M2) (issue 14, deliverable 1):
LayerStats' buffer and accessors, and calibrate's norms against the float64 PEFT per-sample
oracle, including a layer called several times in one forward and batch granularity."""

from __future__ import annotations

import pytest
import torch
from models import batches_of, random_samples, reused_layer_llama, tiny_llama
from oracle import assert_sample_sq, oracle_grads, sample_sq_oracle

import fimlora
from fimlora import LayerStats, backends

RANK, ALPHA = 4, 8.0
TOL = 2e-5  # float32 model and statistics against the float64 oracle


def _assert_norms_match(result, grads, tol=TOL):
    """Every layer's norms against the oracle's per-sample gradients, in sample order; the worst error."""
    worst = 0.0
    for name, g in grads.items():
        stats = result.stats[name]
        assert stats.track_samples and stats.num_sample_norms == stats.count == g.shape[0], name
        worst = max(worst, assert_sample_sq(stats, sample_sq_oracle(g), tol, name))
        per_element = sample_sq_oracle(g) / g[0].numel()
        assert torch.allclose(stats.sample_sq_norms(), per_element, rtol=tol, atol=0), name
    print(f"worst per-sample norm error {worst:.2e}")
    return worst


# ---- LayerStats ------------------------------------------------------------------------------


def test_buffer_grows_keeps_order_and_reports_its_bytes():
    state = LayerStats.zeros(8, 2, track_samples=True)
    assert state.nbytes() == 2 * 16 * 4 and state.num_sample_norms == 0
    values = torch.arange(1, 101, dtype=torch.float32)
    for chunk in values.split(7):  # 15 appends of up to 7: the buffer doubles 7, 14, ..., 112 slots
        state.add_sample_sq_(chunk)
        state.count += chunk.numel()
    assert torch.equal(state.sample_sq(), values)
    assert state.nbytes() == 2 * 16 * 4 + 112 * 4
    assert torch.equal(state.sample_sq_norms(), values.double() / 16)
    state.set_sample_sq_(values[:64])
    state.count = 64
    assert state.nbytes() == 2 * 16 * 4 + 64 * 4, "a gathered set is held at its exact size"


def test_slots_count_only_when_the_op_that_fills_them_succeeds():
    state = LayerStats.zeros(3, 2, track_samples=True)
    state.add_sample_sq_(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="op failed"), state.sample_sq_slots(3) as slots:
        slots.fill_(9.0)
        raise ValueError("op failed")
    assert state.num_sample_norms == 2
    with state.sample_sq_slots(1) as slots:
        slots.fill_(5.0)
    state.count = 3
    assert torch.equal(state.sample_sq(), torch.tensor([1.0, 2.0, 5.0])), "the failed op's values are overwritten"


def test_accessors_refuse_what_they_cannot_give():
    plain = LayerStats.zeros(3, 2)
    with pytest.raises(RuntimeError, match="confidence=True"):
        plain.sample_sq_norms()
    tracked = LayerStats.zeros(3, 2, track_samples=True)
    tracked.update_(torch.randn(4, 3, 2))  # moments folded in without their norms
    with pytest.raises(RuntimeError, match="cover 0 of the 4 gradients"):
        tracked.sample_sq()


def test_mean_sq_is_fisher_minus_variance():
    state = LayerStats.zeros(5, 3, track_samples=True)
    g = torch.Generator().manual_seed(0)
    dy, h = torch.randn(12, 5, generator=g) + 1.0, torch.randn(12, 3, generator=g)
    backends.accumulate(dy, h, torch.tensor([[0, 4], [4, 12]]), 1.0, state, backend="torch")
    assert state.mean_sq() == pytest.approx(state.score("fisher") - state.score("variance"), rel=1e-5)


# ---- calibrate -------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_calibrate_norms_match_float64_oracle(side):
    model = tiny_llama()
    samples = random_samples(10)
    result = fimlora.calibrate(model, batches_of(samples, 4, side=side), rank=RANK, alpha=ALPHA, num_batches=3,
                               confidence=True, progress=False)
    worst = _assert_norms_match(result, oracle_grads(model, samples, list(result.stats), rank=RANK, alpha=ALPHA))
    print(f"llama {side}-padded: worst per-sample norm error against the float64 oracle {worst:.2e}")


def test_confidence_off_keeps_no_norms_and_the_same_moments():
    model, batches = tiny_llama(), batches_of(random_samples(6, seed=2), 3)
    on = fimlora.calibrate(model, batches, rank=RANK, alpha=ALPHA, num_batches=2, confidence=True, progress=False)
    off = fimlora.calibrate(model, batches, rank=RANK, alpha=ALPHA, num_batches=2, confidence=False, progress=False)
    for name, stats in off.stats.items():
        assert not stats.track_samples and stats.nbytes() == 2 * stats.mean.numel() * 4
        assert torch.equal(stats.mean, on.stats[name].mean) and torch.equal(stats.m2, on.stats[name].m2)
        assert on.stats[name].nbytes() - stats.nbytes() == 6 * 4, "2 batches of 3: 4 bytes per sample"


def test_reused_layer_keeps_the_norm_of_the_summed_gradient():
    """One decoder layer run three times per forward: its per-sample gradient is the sum over the
    calls (probe's pending path), and the norm kept is that sum's, not a sum of norms."""
    model = reused_layer_llama()
    samples = random_samples(6, seed=4)
    result = fimlora.calibrate(model, batches_of(samples, 3), rank=RANK, alpha=ALPHA, num_batches=2, confidence=True,
                               progress=False)
    grads = oracle_grads(model, samples, list(result.stats), rank=RANK, alpha=ALPHA)
    assert any("layers.0" in name for name in grads)
    _assert_norms_match(result, grads)


def test_batch_granularity_keeps_one_norm_per_batch():
    model = tiny_llama()
    samples = random_samples(8, seed=5)
    result = fimlora.calibrate(model, batches_of(samples, 4), rank=RANK, alpha=ALPHA, num_batches=2, granularity="batch",
                               confidence=True, progress=False)
    grads = oracle_grads(model, samples, list(result.stats), rank=RANK, alpha=ALPHA)
    # each batch's observation is the gradient of its mean per-sample loss
    batch_grads = {name: torch.stack([g[:4].mean(0), g[4:].mean(0)]) for name, g in grads.items()}
    _assert_norms_match(result, batch_grads)


def test_full_fisher_still_works_without_norms():
    model = tiny_llama()
    stats = fimlora.full_fisher(model, batches_of(random_samples(4, seed=6), 2), num_batches=2, progress=False)
    assert all(not s.track_samples and s.count == 4 for s in stats.values())


@pytest.mark.parametrize("backend", ["torch", "compiled", "triton"])
def test_no_samples_on_a_fresh_tracking_state(backend):
    ok, reason = backends.backend_status(backend, "cpu")
    if not ok:
        pytest.skip(reason)
    state = LayerStats.zeros(4, 2, track_samples=True)
    backends.accumulate(torch.randn(3, 4), torch.randn(3, 2), torch.zeros(0, 2, dtype=torch.long), 1.0, state,
                        backend=backend)
    assert state.count == state.num_sample_norms == 0 and state.sample_sq().shape == (0,)

"""fimlora.fisher.full_fisher against a float64 per-sample loop that reads weight.grad."""

from __future__ import annotations

import copy

import pytest
import torch
from models import batches_of, random_samples, tiny_bert, tiny_llama
from oracle import moments, per_sample_loss, relative_error

import fimlora
from fimlora.fisher import full_fisher

TOL = 5e-5


def weight_grad_oracle(model, samples, names, task="causal-lm") -> dict[str, torch.Tensor]:
    """Per-sample weight gradients {name: (N, d_out, d_in) float64}: each sample alone, unpadded,
    in a float64 copy, its own loss (mean over its own tokens) back-propagated, weight.grad read."""
    reference = copy.deepcopy(model).double().eval()
    layers = {name: reference.get_submodule(name) for name in names}
    for p in reference.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.weight.requires_grad_(True)
    grads = {name: [] for name in names}
    for ids, label in samples:
        reference.zero_grad()
        per_sample_loss(reference, ids, label, task).backward()
        for name, layer in layers.items():
            grads[name].append(layer.weight.grad.detach().clone())
    return {name: torch.stack(g) for name, g in grads.items()}


def worst_error(stats, grads) -> float:
    worst = 0.0
    for name, g in grads.items():
        expected = moments(g)
        state = stats[name]
        assert state.count == g.shape[0], name
        assert state.shape == tuple(g.shape[1:]), name
        for key, actual in (("mean", state.mean), ("variance", state.variance()), ("fisher", state.fisher())):
            worst = max(worst, relative_error(actual, expected[key]))
    return worst


@pytest.mark.parametrize("side", ["right", "left"])
def test_causal_lm_matches_float64_per_sample_loop(side):
    model = tiny_llama()
    samples = random_samples(7, seed=1)
    batches = batches_of(samples, 3, side=side)
    stats = full_fisher(model, batches, num_batches=len(batches), progress=False)
    assert len(stats) == 14  # q, k, v, o, gate, up, down in two blocks; lm_head is never a target
    grads = weight_grad_oracle(model, samples, list(stats))
    worst = worst_error(stats, grads)
    assert worst < TOL, worst


def test_packed_row_matches_oracle():
    """Several samples in one row (position_ids restart at each) are still separate samples."""
    model = tiny_llama()
    samples = random_samples(4, seed=4)
    ids = torch.cat([x for x, _ in samples])[None]
    positions = torch.cat([torch.arange(len(x)) for x, _ in samples])[None]
    stats = full_fisher(model, [{"input_ids": ids, "position_ids": positions}], num_batches=1, progress=False)
    worst = worst_error(stats, weight_grad_oracle(model, samples, list(stats)))
    assert worst < TOL, worst


def test_seq_cls_with_pooled_rows_matches_oracle():
    model = tiny_bert()  # dropout in its config; eval mode turns it off, as in calibration
    samples = random_samples(6, seed=2)
    batches = batches_of(samples, 4, causal=False)
    stats = full_fisher(model, batches, num_batches=2, targets=["query", "output.dense", "pooler.dense"], progress=False)
    assert "bert.pooler.dense" in stats  # acts on one position per row
    grads = weight_grad_oracle(model, samples, list(stats), task="seq-cls")
    worst = worst_error(stats, grads)
    assert worst < TOL, worst


def test_lora_b_statistics_are_a_projection_of_the_full_weight_gradient():
    """G_B = s * G_W A^T per sample (DESIGN §2), so the means agree exactly through A."""
    model = tiny_llama()
    batches = batches_of(random_samples(6, seed=3), 3)
    rank, alpha = 4, 8.0
    full = full_fisher(model, batches, num_batches=2, progress=False)
    lora = fimlora.calibrate(model, batches, num_batches=2, rank=rank, alpha=alpha, progress=False)
    for name, state in full.items():
        d_out, d_in = state.shape
        a = fimlora.draw_calibration_a(name, d_in, rank, 0)
        projected = (alpha / rank) * state.mean.double() @ a.double().T
        assert relative_error(lora.stats[name].mean, projected) < 1e-4, name
        # storage: mean + M2 of d_out x d_in against d_out x r, i.e. d_in / r times more
        assert state.mean.numel() * rank == lora.stats[name].mean.numel() * d_in


def test_model_is_left_unchanged_and_parameters_keep_their_flags():
    model = tiny_llama()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    full_fisher(model, batches_of(random_samples(4), 2), num_batches=2, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}
    assert model.training and all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_hooks_are_removed_when_the_loss_raises():
    model = tiny_llama()

    def broken_loss(model, batch):
        model(input_ids=batch["input_ids"])
        raise KeyError("boom")

    with pytest.raises(KeyError):
        full_fisher(model, batches_of(random_samples(2), 2), loss_fn=broken_loss, num_batches=1, progress=False)
    assert not any(m._forward_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_bad_settings_raise_clear_errors():
    model = tiny_llama()
    batches = batches_of(random_samples(2), 2)
    with pytest.raises(ValueError, match="task="):
        full_fisher(model, batches, task="translation", progress=False)
    with pytest.raises(ValueError, match="num_batches"):
        full_fisher(model, batches, num_batches=0, progress=False)
    with pytest.raises(ValueError, match="matched no linear layer"):
        full_fisher(model, batches, targets=["qproj"], progress=False)

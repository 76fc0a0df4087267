"""A layer called several times in one forward (ALBERT's shared layers, a decoder layer reused)
has one per-sample gradient, the sum over its calls: checked against PEFT's float64 per-sample
loop, whose lora_B.grad sums over the calls by itself."""

from __future__ import annotations

import pytest
import torch
from models import VOCAB, batches_of, random_samples, reused_layer_llama
from oracle import moments, op_oracle, oracle_grads, relative_error

import fimlora
from fimlora.probe import _join_calls

TOL = 2e-5


def _assert_matches(result, grads):
    worst = 0.0
    for name, g in grads.items():
        stats, expected = result.stats[name], moments(g)
        assert stats.count == g.shape[0], f"{name}: one sample per sample, whatever the calls"
        for key, actual in (("mean", stats.mean), ("variance", stats.variance())):
            err = relative_error(actual, expected[key])
            worst = max(worst, err)
            assert err < TOL, f"{name} {key}: relative error {err!r}"
    print(f"worst relative error against the oracle {worst:.1e}")


def tiny_albert():
    from transformers import AlbertConfig, AlbertForSequenceClassification

    torch.manual_seed(0)
    config = AlbertConfig(
        vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=48, num_labels=3, max_position_embeddings=64, pad_token_id=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
    )
    return AlbertForSequenceClassification(config).eval()


def test_albert_shared_layers_match_float64_oracle():
    model = tiny_albert()
    samples = random_samples(7, seed=2)
    result = fimlora.calibrate(model, batches_of(samples, 4, causal=False), rank=4, alpha=8.0, progress=False)
    shared = [name for name in result.stats if "albert_layers.0" in name]
    assert len(shared) == 6, "the one shared layer group's six linears are targets, once each"
    _assert_matches(result, oracle_grads(model, samples, list(result.stats), rank=4, alpha=8.0, task="seq-cls"))


@pytest.mark.parametrize("side", ["right", "left"])
def test_reused_decoder_layer_matches_float64_oracle(side):
    model = reused_layer_llama()
    samples = random_samples(6, seed=4)
    result = fimlora.calibrate(model, batches_of(samples, 3, side=side), rank=4, alpha=8.0, progress=False)
    assert not any("layers.1" in name or "layers.2" in name for name in result.stats)
    _assert_matches(result, oracle_grads(model, samples, list(result.stats), rank=4, alpha=8.0))


def test_joined_calls_give_summed_per_sample_gradients():
    """Packed segments (several samples per row, gaps between them): joining the calls and then
    summing over each sample's tokens equals summing each call's per-sample gradient."""
    g = torch.Generator().manual_seed(0)
    positions, d_out, r, calls = 20, 5, 3, 3
    segments = torch.tensor([[0, 4], [4, 9], [12, 13], [15, 20]])
    pending = [(torch.randn(positions, d_out, generator=g, dtype=torch.float64),
                torch.randn(positions, r, generator=g, dtype=torch.float64)) for _ in range(calls)]
    probe = type("Probe", (), {"name": "shared"})()
    dy, h, joined = _join_calls(probe, pending, {positions: segments})
    assert joined.tolist() == [[0, 12], [12, 27], [27, 30], [30, 45]]
    expected = sum(op_oracle(d, x, segments, 1.0) for d, x in pending)
    torch.testing.assert_close(op_oracle(dy, h, joined, 1.0), expected, rtol=1e-12, atol=1e-12)

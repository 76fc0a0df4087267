"""Many architectures from transformers, tiny and from configs, against the per-sample PEFT oracle:
grouped-query attention with qk-norm (Qwen3), soft-capping and sliding windows (Gemma 2/3,
Mistral), fused projections (Phi-3), learned positions (OPT, RoBERTa, DistilBERT), and mixtures
of experts (Mixtral, Qwen2-MoE: their experts and routers are fused parameters, not linear
layers, so the attention and shared-expert linears are the targets, as with PEFT's all-linear).
Causal models are checked with right and left padding."""

from __future__ import annotations

import pytest
import torch
import transformers
from models import VOCAB, batches_of, random_samples
from oracle import moments, oracle_grads, relative_error

import fimlora

COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              max_position_embeddings=64, pad_token_id=0)
DECODER = dict(COMMON, num_key_value_heads=2)
# name -> (config class, its arguments, model class, task)
ARCHITECTURES = {
    "qwen3": ("Qwen3Config", dict(DECODER, head_dim=8), "Qwen3ForCausalLM", "causal-lm"),
    "gemma2": ("Gemma2Config", dict(DECODER, head_dim=8), "Gemma2ForCausalLM", "causal-lm"),
    "gemma3": ("Gemma3TextConfig", dict(DECODER, head_dim=8), "Gemma3ForCausalLM", "causal-lm"),
    "mistral": ("MistralConfig", dict(DECODER, sliding_window=4), "MistralForCausalLM", "causal-lm"),
    "phi3": ("Phi3Config", DECODER, "Phi3ForCausalLM", "causal-lm"),
    "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                              max_position_embeddings=64, pad_token_id=0, word_embed_proj_dim=32, dropout=0.0),
            "OPTForCausalLM", "causal-lm"),
    "mixtral": ("MixtralConfig", dict(DECODER, num_local_experts=4, num_experts_per_tok=2), "MixtralForCausalLM",
                "causal-lm"),
    "qwen2-moe": ("Qwen2MoeConfig", dict(DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=32), "Qwen2MoeForCausalLM", "causal-lm"),
    "roberta": ("RobertaConfig", dict(COMMON, max_position_embeddings=70, pad_token_id=1, num_labels=3,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                "RobertaForSequenceClassification", "seq-cls"),
    "distilbert": ("DistilBertConfig", dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                            max_position_embeddings=64, pad_token_id=0, num_labels=3, dropout=0.0,
                                            attention_dropout=0.0),
                   "DistilBertForSequenceClassification", "seq-cls"),
}
MIXTURES = {"mixtral", "qwen2-moe"}  # transformers' grouped expert matmul has no float64: oracle in float32
TOL = 2e-5


def _model(name: str):
    config_class, arguments, model_class, _ = ARCHITECTURES[name]
    if not hasattr(transformers, config_class):
        pytest.skip(f"transformers {transformers.__version__} has no {config_class}")
    torch.manual_seed(0)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**arguments)).eval()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_matches_per_sample_oracle(name):
    model = _model(name)
    task = ARCHITECTURES[name][3]
    samples = random_samples(6, seed=1, min_len=4)
    sides = ("right", "left") if task == "causal-lm" else ("right",)
    grads, worst = None, 0.0
    for side in sides:
        batches = batches_of(samples, 3, side=side, causal=task == "causal-lm")
        result = fimlora.calibrate(model, batches, rank=4, alpha=8.0, progress=False)
        assert result.settings.task == task
        if grads is None:
            grads = oracle_grads(model, samples, list(result.stats), rank=4, alpha=8.0, task=task,
                                 dtype=None if name in MIXTURES else torch.float64)
        for layer, g in grads.items():
            expected, stats = moments(g), result.stats[layer]
            assert stats.count == len(samples), layer
            for key, actual in (("mean", stats.mean), ("variance", stats.variance())):
                err = relative_error(actual, expected[key])
                worst = max(worst, err)
                assert err < TOL, f"{name} {side}-padded {layer} {key}: relative error {err!r}"
    print(f"{name}: {len(grads)} layers, worst relative error against the oracle {worst:.1e}")

"""Calibration statistics against the float64 per-sample PEFT oracle, and their invariances."""

from __future__ import annotations

import pytest
import torch
from models import batches_of, pad_batch, random_samples, reused_layer_llama, tiny_bert, tiny_gpt2, tiny_llama
from oracle import assert_stats, moments, oracle_grads, relative_error

import fimlora

RANK, ALPHA = 4, 8.0
TOL = 2e-5  # float32 model and statistics against the float64 oracle


def _assert_matches_oracle(result, grads, tol=TOL):
    worst = 0.0
    for name, g in grads.items():
        expected = moments(g)
        stats = result.stats[name]
        assert stats.count == g.shape[0], name
        for key, actual in (("mean", stats.mean), ("variance", stats.variance()), ("fisher", stats.fisher())):
            err = relative_error(actual, expected[key])
            worst = max(worst, err)
            assert err < tol, f"{name} {key}: relative error {err!r}"
        for score in ("variance", "fisher"):
            ref = float(expected[score].mean())
            assert abs(stats.score(score) - ref) <= tol * abs(ref), (name, score)
    return worst


@pytest.mark.parametrize("side", ["right", "left"])
def test_llama_matches_float64_oracle(side):
    model = tiny_llama()
    samples = random_samples(10)
    result = fimlora.calibrate(
        model, batches_of(samples, 4, side=side), rank=RANK, alpha=ALPHA, progress=False, num_batches=3
    )
    grads = oracle_grads(model, samples, list(result.stats), rank=RANK, alpha=ALPHA)
    worst = _assert_matches_oracle(result, grads)
    print(f"llama {side}-padded: worst relative error against float64 oracle {worst:.2e}")


@pytest.mark.parametrize("side", ["right", "left"])
def test_gpt2_conv1d_layers_match_float64_oracle(side):
    """transformers' Conv1D (weight stored transposed) is a linear target like any other."""
    model = tiny_gpt2()
    samples = random_samples(6, seed=1)
    result = fimlora.calibrate(model, batches_of(samples, 3, side=side), rank=RANK, alpha=ALPHA, progress=False)
    assert len(result.stats) == 8 and "transformer.h.0.attn.c_attn" in result.stats  # 4 Conv1D per block
    assert result.stats["transformer.h.0.attn.c_attn"].shape == (96, RANK)  # d_out = 3 * hidden
    _assert_matches_oracle(result, oracle_grads(model, samples, list(result.stats), rank=RANK, alpha=ALPHA))


def test_llama_float64_statistics_are_exact():
    model = tiny_llama().double()
    samples = random_samples(6, seed=3)
    result = fimlora.calibrate(
        model, batches_of(samples, 3), rank=RANK, alpha=ALPHA, stats_dtype=torch.float64, progress=False
    )
    grads = oracle_grads(model, samples, list(result.stats), rank=RANK, alpha=ALPHA)
    _assert_matches_oracle(result, grads, tol=1e-10)


def test_bert_classifier_matches_float64_oracle():
    model = tiny_bert()
    samples = random_samples(9, seed=1)
    batches = batches_of(samples, 4, causal=False)
    result = fimlora.calibrate(model, batches, rank=RANK, alpha=ALPHA, progress=False)
    assert result.settings.task == "seq-cls"
    assert not any("classifier" in name for name in result.stats)  # the new head is not a target
    grads = oracle_grads(model, samples, list(result.stats), rank=RANK, alpha=ALPHA, task="seq-cls")
    _assert_matches_oracle(result, grads)


def test_one_batch_equals_batches_of_one():
    model = tiny_llama()
    samples = random_samples(6, seed=2)
    together = fimlora.calibrate(model, [pad_batch(samples)], progress=False)
    apart = fimlora.calibrate(model, batches_of(samples, 1), progress=False)
    for name, stats in together.stats.items():
        assert stats.count == 6
        # float32 summed in another order (batch shape): normwise, as the oracle comparisons are
        assert_stats(apart.stats[name], stats, tol=1e-5, what=name)


def test_batch_granularity_matches_oracle_batch_gradients():
    model = tiny_llama()
    samples = random_samples(8, seed=4)
    result = fimlora.calibrate(model, batches_of(samples, 2), granularity="batch", progress=False)
    grads = oracle_grads(model, samples, list(result.stats), rank=8, alpha=8.0)
    # one observation per batch: the gradient of that batch's mean per-sample loss
    batch_grads = {name: g.view(4, 2, *g.shape[1:]).mean(dim=1) for name, g in grads.items()}
    _assert_matches_oracle(result, batch_grads)


def test_targets_by_suffix_and_regex():
    model = tiny_llama()
    data = batches_of(random_samples(4), 2)
    by_suffix = fimlora.calibrate(model, data, targets=["q_proj", "down_proj"], progress=False)
    assert sorted(by_suffix.stats) == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")
    )
    by_regex = fimlora.calibrate(model, data, targets=r".*layers\.1\..*_proj", progress=False)
    assert len(by_regex.stats) == 7 and all(".1." in name for name in by_regex.stats)
    assert "lm_head" not in fimlora.calibrate(model, data, progress=False).stats


def test_existing_peft_model_uses_its_own_lora_a_and_scale():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    samples = random_samples(5, seed=5)
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj"]
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=3, lora_alpha=6, target_modules=names, lora_dropout=0.0))
    for name in names:  # make the oracle's A (drawn from seed 7) the PEFT model's own
        layer = peft_model.base_model.model.get_submodule(name)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(fimlora.draw_calibration_a(name, layer.in_features, 3, 7))
    result = fimlora.calibrate(peft_model, batches_of(samples, 5), progress=False)
    assert sorted(result.stats) == sorted(names)
    grads = oracle_grads(model, samples, names, rank=3, alpha=6, seed=7)
    _assert_matches_oracle(result, grads)


class _FeatureMask(torch.nn.Module):
    """A deterministic stand-in for LoRA dropout: zeroes every third input feature."""

    def forward(self, x):
        mask = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        mask[::3] = 0
        return x * mask


def test_peft_lora_dropout_input_is_what_lora_a_sees():
    """In a PEFT model lora_A multiplies dropout(x), not x: masking the input is the same as
    masking A's columns."""
    from peft import LoraConfig, get_peft_model

    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj"]
    config = LoraConfig(r=3, lora_alpha=6, target_modules=names, lora_dropout=0.0)
    masked, plain = get_peft_model(tiny_llama(), config), get_peft_model(tiny_llama(), config)
    for name in names:
        masked_layer = masked.base_model.model.get_submodule(name)
        masked_layer.lora_dropout["default"] = _FeatureMask()
        with torch.no_grad():
            plain.base_model.model.get_submodule(name).lora_A["default"].weight.copy_(
                _FeatureMask()(masked_layer.lora_A["default"].weight))
    data = batches_of(random_samples(5, seed=5), 5)
    with_dropout = fimlora.calibrate(masked, data, train=True, progress=False)
    reference = fimlora.calibrate(plain, data, progress=False)
    for name in names:
        torch.testing.assert_close(with_dropout.stats[name].m2, reference.stats[name].m2, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(with_dropout.stats[name].mean, reference.stats[name].mean, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("make_model", [tiny_llama, reused_layer_llama], ids=["llama", "reused-layer"])
def test_gradient_checkpointing_gives_same_statistics(use_reentrant, make_model):
    """Checkpointing re-runs forwards in the backward: a call must be neither lost (reentrant: the
    first forward runs without grad) nor counted twice (non-reentrant), a reused layer's included."""
    samples = random_samples(6, seed=6)
    plain = fimlora.calibrate(make_model(), batches_of(samples, 3), progress=False)
    model = make_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.train()  # transformers only checkpoints in train mode; dropout is 0 in this config
    checkpointed = fimlora.calibrate(model, batches_of(samples, 3), train=True, progress=False)
    for name, stats in plain.stats.items():
        assert checkpointed.stats[name].count == stats.count  # hooks fired once per real forward
        torch.testing.assert_close(checkpointed.stats[name].mean, stats.mean, rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(checkpointed.stats[name].m2, stats.m2, rtol=1e-4, atol=1e-12)
    assert model.training


def test_bf16_model_gives_float32_statistics_close_to_float32_model():
    samples = random_samples(6, seed=8)
    reference = fimlora.calibrate(tiny_llama(), batches_of(samples, 3), progress=False)
    low = fimlora.calibrate(tiny_llama().to(torch.bfloat16), batches_of(samples, 3), progress=False)
    for name, stats in reference.stats.items():
        assert low.stats[name].mean.dtype == torch.float32
        assert relative_error(low.stats[name].variance(), stats.variance()) < 0.1, name


def test_scores_follow_the_chosen_statistic():
    model = tiny_llama()
    result = fimlora.calibrate(model, batches_of(random_samples(6), 3), progress=False)
    for name, value in result.scores("fisher").items():
        assert value == pytest.approx(float(result.stats[name].fisher().double().mean()))
    for name, value in result.scores().items():  # the default: variance
        assert value == pytest.approx(float(result.stats[name].variance().double().mean()))
    with pytest.raises(ValueError, match="score='entropy' is not known"):
        result.scores("entropy")


def test_settings_are_a_typed_record():
    result = fimlora.calibrate(tiny_llama(), batches_of(random_samples(6), 3), num_batches=2, seed=3, progress=False)
    settings = result.settings
    assert isinstance(settings, fimlora.CalibrationSettings)
    assert (settings.num_batches, settings.samples, settings.seed, settings.world_size) == (2, 6, 3, 1)
    with pytest.raises(AttributeError):
        settings.seed = 4  # frozen: the record of what ran
    assert settings.to_dict()["targets"] == "all-linear"


def test_packed_row_equals_padded_batch():
    """Several samples in one row (position_ids restart at each): same statistics as padding them."""
    model = tiny_llama()
    samples = random_samples(5, seed=10)
    padded = fimlora.calibrate(model, [pad_batch(samples)], num_batches=1, progress=False)
    ids = torch.cat([x for x, _ in samples])[None]
    positions = torch.cat([torch.arange(len(x)) for x, _ in samples])[None]
    packed = fimlora.calibrate(model, [{"input_ids": ids, "position_ids": positions}], num_batches=1, progress=False)
    assert packed.settings.samples == 5
    for name, stats in padded.stats.items():
        assert stats.count == 5
        assert_stats(packed.stats[name], stats, tol=1e-5, what=name)  # float32, normwise


def test_packed_rows_need_a_causal_lm():
    ids = torch.randint(1, 90, (1, 8))
    batch = {"input_ids": ids, "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]), "labels": torch.tensor([1])}
    with pytest.raises(ValueError, match="packed rows .* causal-lm only"):
        fimlora.calibrate(tiny_bert(), [batch], num_batches=1, progress=False)

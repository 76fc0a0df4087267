"""Plans become standard PEFT adapters: vanilla PEFT loads them, outputs and merges agree."""

from __future__ import annotations

import math

import pytest
import torch
from models import batches_of, random_samples, tiny_bert, tiny_gpt2, tiny_llama
from peft import LoraConfig, PeftModel

import fimlora
from fimlora import AllocationConfig, Budget, get_peft_model, make_plan
from fimlora.adapter import PlanMismatchError, apply_plan, export_for_serving, lora_config_from_plan
from fimlora.targets import is_lora_layer


def _lora_layers(peft_model):
    return {n: m for n, m in peft_model.base_model.model.named_modules() if is_lora_layer(m)}


def _randomise_b(peft_model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _lora_layers(peft_model).values():
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def _plan(model, base_alpha=None, **allocation):
    result = fimlora.calibrate(model, batches_of(random_samples(8), 4), progress=False, num_batches=2)
    return make_plan(result, AllocationConfig(**allocation), base_rank=4, base_alpha=base_alpha)


def test_one_call_get_peft_model_spends_the_uniform_budget():
    model = tiny_llama()
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    peft_model = get_peft_model(model, batches_of(random_samples(8), 4), config, progress=False, num_batches=2)
    plan = peft_model.fimlora_plan
    layers = _lora_layers(peft_model)
    assert sorted(layers) == sorted(layer.name for layer in plan.layers)
    uniform = sum(4 * (m.in_features + m.out_features) for m in layers.values())
    used = sum(m.r["default"] * (m.in_features + m.out_features) for m in layers.values())
    assert used == plan.budget_used <= uniform == plan.budget_total
    assert used > 0.95 * uniform
    assert {m.r["default"] for m in layers.values()} != {4}, "scores should move ranks away from uniform"
    for name, layer in layers.items():
        assert layer.r["default"] == plan.ranks[name]
        assert 2 <= layer.r["default"] <= 8  # r_min = r/2, r_max = 2r
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == used


def test_conv1d_plan_builds_a_fan_in_fan_out_adapter(tmp_path, recwarn):
    """GPT-2's Conv1D layers: PEFT is told fan_in_fan_out up front (no warning, no guessing), the
    ranks land, and vanilla PEFT reloads the adapter with the same outputs."""
    model = tiny_gpt2()
    plan = _plan(model)
    peft_model = apply_plan(model, plan, LoraConfig(lora_dropout=0.0))
    assert peft_model.peft_config["default"].fan_in_fan_out is True
    assert not [w for w in recwarn if "fan_in_fan_out" in str(w.message)]
    layers = _lora_layers(peft_model)
    assert {name: layer.r["default"] for name, layer in layers.items()} == {n: r for n, r in plan.ranks.items() if r}
    _randomise_b(peft_model)
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected)


@pytest.mark.parametrize("policy", ["fixed_scale", "fixed_alpha", "rslora"])
def test_alpha_policies_set_peft_scaling(policy):
    model = tiny_llama()
    plan = _plan(model, base_alpha=16, alpha_policy=policy)
    peft_model = apply_plan(model, plan, LoraConfig(lora_dropout=0.0))
    for layer in _lora_layers(peft_model).values():
        r = layer.r["default"]
        expected = {"fixed_scale": 16 / 4, "fixed_alpha": 16 / r, "rslora": 16 / math.sqrt(r)}[policy]
        assert layer.scaling["default"] == pytest.approx(expected)


def test_save_vanilla_load_same_outputs_and_merge(tmp_path):
    plan = _plan(tiny_llama(), alpha_policy="fixed_alpha")
    peft_model = apply_plan(tiny_llama(), plan, LoraConfig(lora_dropout=0.0))
    _randomise_b(peft_model)
    ids = torch.randint(1, 90, (2, 9))
    expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    assert {n: m.r["default"] for n, m in _lora_layers(loaded).items()} == {
        n: r for n, r in plan.ranks.items() if r > 0
    }
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_serving_export_has_one_global_scale_and_same_outputs(tmp_path):
    plan = _plan(tiny_llama(), base_alpha=16, alpha_policy="rslora")
    peft_model = apply_plan(tiny_llama(), plan, LoraConfig(lora_dropout=0.0))
    _randomise_b(peft_model, seed=1)
    ids = torch.randint(1, 90, (2, 7))
    expected = peft_model(input_ids=ids).logits
    export_for_serving(peft_model, tmp_path / "serve")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "serve").eval()
    config = loaded.peft_config["default"]
    assert not config.use_rslora
    for layer in _lora_layers(loaded).values():
        assert layer.scaling["default"] == pytest.approx(config.lora_alpha / config.r)
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)


def test_rank_zero_layers_are_left_out():
    model = tiny_llama()
    result = fimlora.calibrate(model, batches_of(random_samples(8), 4), progress=False, num_batches=2)
    plan = make_plan(result, AllocationConfig(r_min=0, budget=Budget.total_rank(10)), base_rank=4)
    zero = [layer.name for layer in plan.layers if layer.rank == 0]
    assert zero, "a 10-rank budget over 14 layers must leave some at 0"
    config = lora_config_from_plan(plan, model=model)
    assert not set(zero) & set(config.target_modules)
    peft_model = apply_plan(model, plan)
    assert not set(zero) & set(_lora_layers(peft_model))


def test_keys_are_anchored_and_match_exactly_one_module():
    model = tiny_llama()
    config = lora_config_from_plan(_plan(model), model=model)
    assert all(key.startswith("^") for key in config.rank_pattern)
    assert len(config.rank_pattern) == 14


def test_plan_for_another_model_is_rejected_before_wrapping():
    plan = _plan(tiny_llama())
    bert = tiny_bert()
    with pytest.raises(PlanMismatchError, match=r"(?s)does not fit this model \(14 problem\(s\)\).*no such module"):
        apply_plan(bert, plan)
    assert not _lora_layers_in(bert)


def test_plan_with_wrong_shapes_is_rejected():
    plan = _plan(tiny_llama())
    other = tiny_llama(intermediate_size=40)
    with pytest.raises(PlanMismatchError, match=r"mlp.up_proj: model has \(d_in, d_out\) = \(32, 40\)"):
        apply_plan(other, plan)


def _lora_layers_in(model):
    return [m for m in model.modules() if is_lora_layer(m)]


def test_one_call_accepts_a_dataset_of_tokenised_examples():
    """A tokenised datasets.Dataset yields one dict of lists per row; a list of such rows stands in."""
    samples = random_samples(8, seed=9)
    rows = [{"input_ids": ids.tolist(), "labels": ids.tolist()} for ids, _ in samples]
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    from_rows = get_peft_model(tiny_llama(), rows, config, batch_size=4, num_batches=2, progress=False)
    from_batches = get_peft_model(tiny_llama(), batches_of(samples, 4), config, num_batches=2, progress=False)
    assert from_rows.fimlora_plan.ranks == from_batches.fimlora_plan.ranks
    assert from_rows.fimlora_plan.calibration["samples"] == 8


def test_a_single_sample_plan_says_why_it_is_uniform():
    result = fimlora.calibrate(tiny_llama(), batches_of(random_samples(1), 1), progress=False)
    with pytest.warns(UserWarning, match="at least 2 samples"):
        plan = make_plan(result, base_rank=4)
    assert set(plan.ranks.values()) == {4}


def test_use_rslora_in_the_lora_config_is_honoured():
    """LoraConfig(use_rslora=True) means the rslora alpha policy: every layer scales alpha/sqrt(r)."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, use_rslora=True)
    peft_model = get_peft_model(tiny_llama(), batches_of(random_samples(8), 4), config, progress=False, num_batches=2)
    assert peft_model.fimlora_plan.alpha_policy == "rslora"
    for layer in _lora_layers(peft_model).values():
        assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(layer.r["default"]))


def test_use_rslora_against_an_explicit_alpha_policy_is_refused_before_calibration():
    config = LoraConfig(r=4, target_modules="all-linear", use_rslora=True)

    def data():
        raise AssertionError("calibration started before the settings were checked")
        yield

    with pytest.raises(ValueError, match=r"use_rslora=True\) contradicts alpha_policy='fixed_alpha'"):
        get_peft_model(tiny_llama(), data(), config, allocation=AllocationConfig(alpha_policy="fixed_alpha"))
    plan = _plan(tiny_llama(), alpha_policy="fixed_scale")
    with pytest.raises(PlanMismatchError, match=r"use_rslora=True but the plan's alpha policy is 'fixed_scale'"):
        lora_config_from_plan(plan, config)


@pytest.mark.parametrize(
    ("allocation", "message"),
    [
        (dict(alpha_policy="sqrt"), r"AllocationConfig.alpha_policy='sqrt' is not known; use one of fixed_scale"),
        (dict(score="entropy"), r"AllocationConfig.score='entropy' is not known; use one of variance, fisher"),
        (dict(r_min=9, r_max=4), r"AllocationConfig.r_min=9 is above r_max=4; lower r_min or raise r_max"),
        (dict(temperature=float("nan")), r"AllocationConfig.temperature=nan must be finite"),
        (dict(multiple_of=0), r"AllocationConfig.multiple_of=0 must be an integer >= 1"),
        (dict(budget="8"), r"AllocationConfig.budget='8' must be a fimlora.Budget"),
    ],
)
def test_bad_allocation_settings_are_refused_when_made(allocation, message):
    with pytest.raises(ValueError, match=message):
        AllocationConfig(**allocation)


def test_allocation_is_checked_against_the_targets_before_calibration():
    config = LoraConfig(r=4, target_modules="all-linear")

    def data():
        raise AssertionError("calibration started before the settings were checked")
        yield

    with pytest.raises(ValueError, match=r"budget total=10 is infeasible"):
        get_peft_model(tiny_llama(), data(), config, allocation=AllocationConfig(budget=Budget.total_rank(10)))
    with pytest.raises(ValueError, match=r"lora_alpha=0 must be a finite number > 0"):
        get_peft_model(tiny_llama(), data(), LoraConfig(r=4, lora_alpha=0))
    with pytest.raises(TypeError, match=r"budget belong\(s\) to the allocation: pass allocation=AllocationConfig"):
        get_peft_model(tiny_llama(), data(), config, budget=Budget.total_rank(10))
    with pytest.raises(ValueError, match=r"targets regex '\(\[' is not a valid regular expression"):
        get_peft_model(tiny_llama(), data(), LoraConfig(r=4, target_modules="(["))

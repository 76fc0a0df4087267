"""The model is left bit-identical; bad input fails early with a message that says what to do."""

from __future__ import annotations

import pytest
import torch
from models import batches_of, random_samples, tiny_llama

import fimlora


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def _assert_untouched(model, before):
    after = _snapshot(model)
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert all(p.grad is None for p in model.parameters())


def _mixed_state_model():
    model = tiny_llama()
    model.model.layers[0].mlp.requires_grad_(False)  # mixed flags must come back exactly
    model.model.layers[1].train()  # and mixed train/eval modes
    return model


def test_model_is_bit_identical_after_calibration():
    model = _mixed_state_model()
    before = _snapshot(model)
    fimlora.calibrate(model, batches_of(random_samples(6), 3), progress=False)
    _assert_untouched(model, before)


def test_calibration_inside_no_grad_measures_all_the_same():
    """Evaluation code often runs under torch.no_grad(); calibration turns gradients back on."""
    data = batches_of(random_samples(6), 3)
    expected = fimlora.calibrate(tiny_llama(), data, progress=False)
    model = tiny_llama()
    before = _snapshot(model)
    with torch.no_grad():
        result = fimlora.calibrate(model, data, progress=False)
        assert not torch.is_grad_enabled()
    _assert_untouched(model, before)
    for name, stats in expected.stats.items():
        torch.testing.assert_close(result.stats[name].m2, stats.m2, rtol=1e-6, atol=0)


def test_inference_mode_is_refused_with_the_reason():
    model = tiny_llama()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        fimlora.calibrate(model, batches_of(random_samples(2), 2), progress=False)


def test_model_is_restored_when_the_loss_raises_midway():
    model = _mixed_state_model()
    before = _snapshot(model)
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the harshest kind of interruption
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits.float().logsumexp(-1).mean(-1)

    with pytest.raises(KeyboardInterrupt):
        fimlora.calibrate(model, batches_of(random_samples(6), 2), loss_fn=loss_fn, progress=False)
    assert len(calls) == 2
    _assert_untouched(model, before)


def test_model_is_restored_when_the_backward_raises():
    model = _mixed_state_model()
    before = _snapshot(model)
    data = batches_of(random_samples(4), 2)
    with fimlora.use_backend("torch"), pytest.raises(RuntimeError, match="boom"):

        def loss_fn(m, batch):
            out = m(**{k: v for k, v in batch.items() if k != "labels"}).logits.float().mean((1, 2))
            out.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("boom")))
            return out

        fimlora.calibrate(model, data, loss_fn=loss_fn, progress=False)
    _assert_untouched(model, before)


def test_unknown_targets_list_existing_linear_names():
    with pytest.raises(ValueError, match=r"matched no linear layer.*q_proj.*v_proj"):
        fimlora.calibrate(tiny_llama(), batches_of(random_samples(2), 2), targets=["qproj"], progress=False)


def test_empty_data():
    with pytest.raises(ValueError, match="calibration data is empty"):
        fimlora.calibrate(tiny_llama(), [], progress=False)


def test_batches_must_be_dicts_with_input_ids():
    with pytest.raises(ValueError, match="must be a dict with at least 'input_ids'"):
        fimlora.calibrate(tiny_llama(), [torch.zeros(2, 3)], progress=False)


def test_fewer_batches_than_asked_warns_and_continues():
    with pytest.warns(UserWarning, match="only 2 batches of the 8"):
        result = fimlora.calibrate(tiny_llama(), batches_of(random_samples(4), 2), progress=False)
    assert result.settings.num_batches == 2


def test_non_finite_loss_names_the_batch():
    model = tiny_llama()

    def loss_fn(m, batch):
        logits = m(input_ids=batch["input_ids"]).logits.float().mean((1, 2))
        return logits * torch.tensor([1.0, float("nan")])

    with pytest.raises(fimlora.NonFiniteError, match=r"non-finite loss in batch 1 of 8 \(index 0\) \(samples \[1\]\)"):
        fimlora.calibrate(model, batches_of(random_samples(4), 2), loss_fn=loss_fn, progress=False)


def test_non_finite_gradient_names_layer_and_batch():
    model = tiny_llama()
    seen = []

    def loss_fn(m, batch):
        seen.append(1)
        logits = m(input_ids=batch["input_ids"]).logits.float()
        x = logits[:, 0, 0]
        if len(seen) == 2:  # finite loss (0) whose gradient is infinite: sqrt at 0
            return (x - x.detach()).abs().sqrt()
        return x

    with pytest.raises(fimlora.NonFiniteError, match=r"non-finite gradient statistics in layer model\.layers\.\d.* after batch 2 of 8 \(index 1\)"):
        fimlora.calibrate(model, batches_of(random_samples(4), 2), loss_fn=loss_fn, progress=False)


def test_loss_must_be_per_sample():
    def loss_fn(m, batch):
        return m(input_ids=batch["input_ids"]).logits.float().mean()

    with pytest.raises(ValueError, match=r"one value per sample, shape \(2,\)"):
        fimlora.calibrate(tiny_llama(), batches_of(random_samples(2), 2), loss_fn=loss_fn, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"granularity": "token"}, "granularity='token' is not known"),
        ({"task": "translation"}, "task='translation' is not known"),
        ({"num_batches": 0}, "num_batches must be a positive integer"),
        ({"rank": 0}, "rank .* must be a positive integer"),
        ({"backend": "cuda-magic"}, "backend='cuda-magic' is not known"),
    ],
)
def test_bad_settings_fail_before_any_work(kwargs, message):
    def data():
        raise AssertionError("data was read before the settings were checked")
        yield

    with pytest.raises(ValueError, match=message):
        fimlora.calibrate(tiny_llama(), data(), progress=False, **kwargs)


def test_unknown_task_of_a_plain_module_asks_for_task_or_loss_fn():
    with pytest.raises(ValueError, match="pass task='causal-lm', 'seq-cls' or 'seq2seq-lm'"):
        fimlora.calibrate(torch.nn.Sequential(torch.nn.Linear(3, 3)), [], progress=False)


def test_attention_mask_with_a_gap_is_rejected():
    batch = batches_of(random_samples(2, min_len=6), 2)[0]
    batch["attention_mask"][0, 2] = 0
    with pytest.raises(ValueError, match="contiguous"):
        fimlora.calibrate(tiny_llama(), [batch], progress=False)

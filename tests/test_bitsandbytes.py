"""bitsandbytes 4-bit and 8-bit base layers are calibrated as they are, never dequantized for good.

References: for 4-bit layers, the float64 per-sample PEFT oracle on the dequantized weights; for
8-bit layers, whose matmul also quantizes its input, PEFT's per-sample loop over the quantized
model itself at its own precision (a quantized model has no float64 form).
"""

from __future__ import annotations

import pytest
import torch
from models import batches_of, random_samples, tiny_llama
from oracle import moments, oracle_grads, relative_error

import fimlora

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")

MLP = ("gate_proj", "up_proj", "down_proj")
SIZES = dict(hidden_size=64, intermediate_size=128)  # sizes the 4-bit CPU kernel can tile


def _quantized(layer: torch.nn.Linear, kind: str) -> torch.nn.Module:
    weight = layer.weight.detach().clone()
    if kind == "nf4":
        module = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=False,
                                   compute_dtype=torch.float32, quant_type="nf4")
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        module = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=False, has_fp16_weights=False)
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    return module.to("cpu")  # moving to a device is what quantizes the weight


def _quantize_mlps(model, kind):
    for layer in model.model.layers:
        for name in MLP:
            setattr(layer.mlp, name, _quantized(getattr(layer.mlp, name), kind))
    return model


def _dequantized_copy(model):
    """The same model with each 4-bit linear replaced by a plain linear holding the weight the
    4-bit layer computes with (its forward and backward are bit-identical to that matmul)."""
    plain = tiny_llama(**SIZES)
    for layer, quantized in zip(plain.model.layers, model.model.layers, strict=True):
        for name in MLP:
            weight = getattr(quantized.mlp, name).weight
            getattr(layer.mlp, name).weight.data.copy_(bnb.functional.dequantize_4bit(weight.data, weight.quant_state))
    return plain


def _worst_error(result, grads):
    worst = 0.0
    for name, g in grads.items():
        expected, stats = moments(g), result.stats[name]
        assert stats.count == g.shape[0], name
        for key, actual in (("mean", stats.mean), ("variance", stats.variance())):
            worst = max(worst, relative_error(actual, expected[key]))
    return worst


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_bitsandbytes_layers_are_calibrated_as_they_are(kind):
    model = _quantize_mlps(tiny_llama(**SIZES), kind)
    weight_type = type(model.model.layers[0].mlp.up_proj.weight)
    samples = random_samples(6, seed=5)
    result = fimlora.calibrate(model, batches_of(samples, 3), rank=4, alpha=8.0, progress=False)
    quantized = [name for name in result.stats if name.split(".")[-1] in MLP]
    assert len(quantized) == 3 * len(model.model.layers), "every bitsandbytes linear is a target"
    if kind == "nf4":  # float64 PEFT oracle on the weights the 4-bit layers compute with
        grads = oracle_grads(_dequantized_copy(model), samples, quantized, rank=4, alpha=8.0)
    else:  # the int8 matmul also quantizes its input (in float16): only the model itself can be the reference
        grads = oracle_grads(model, samples, quantized, rank=4, alpha=8.0, dtype=None)
    worst = _worst_error(result, grads)
    print(f"bitsandbytes {kind}: worst relative error against the per-sample PEFT reference {worst:.2e}")
    assert worst < 2e-5
    layer = model.model.layers[0].mlp.up_proj
    assert type(layer.weight) is weight_type and layer.weight.dtype in (torch.uint8, torch.int8), \
        "the quantized weight must stay quantized"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_calibration_leaves_4bit_weights_as_they_were():
    """bitsandbytes repacks a 4-bit weight in place when an eval-mode call's input needs no grad
    (on CPUs with AVX512-BF16): with every linear quantized, the first ones see such inputs. The
    calibration must neither trigger that nor measure the repacked kernel's arithmetic."""
    model = tiny_llama(**SIZES)
    for layer in model.model.layers:
        for module in (layer.self_attn, layer.mlp):
            for name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(module, name, _quantized(child, "nf4"))
    before = {name: p.data.clone() for name, p in model.named_parameters()}
    samples = random_samples(6, seed=5)
    result = fimlora.calibrate(model, batches_of(samples, 3), rank=4, alpha=8.0, progress=False)
    for name, p in model.named_parameters():
        assert torch.equal(p.data, before[name]), f"{name} was changed by the calibration"
    assert not any(getattr(getattr(p, "quant_state", None), "packing_format_for_cpu", False)
                   for p in model.parameters())
    plain = tiny_llama(**SIZES)
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            plain.get_submodule(name).weight.data.copy_(weight)
    grads = oracle_grads(plain, samples, list(result.stats), rank=4, alpha=8.0)
    assert _worst_error(result, grads) < 2e-5

"""Offloaded layers and quantized/wrapped linears calibrate like their plain counterparts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import batches_of, random_samples, tiny_llama
from torch import nn

import fimlora


def _close(a, b):
    assert sorted(a.stats) == sorted(b.stats)
    for name, stats in a.stats.items():
        assert b.stats[name].count == stats.count
        torch.testing.assert_close(b.stats[name].mean, stats.mean, rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(b.stats[name].m2, stats.m2, rtol=1e-4, atol=1e-12)


def test_offloaded_model_matches_resident_model():
    accelerate = pytest.importorskip("accelerate")
    data = batches_of(random_samples(6, seed=12), 3)
    resident = fimlora.calibrate(tiny_llama(), data, num_batches=2, progress=False)
    model = accelerate.cpu_offload(tiny_llama(), execution_device="cpu")  # weights wait on the meta device
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    offloaded = fimlora.calibrate(model, data, num_batches=2, progress=False)
    _close(resident, offloaded)
    assert all(s.mean.device.type == "cpu" for s in offloaded.stats.values())



def test_device_map_with_disk_offload_matches_resident_model(tmp_path):
    """transformers' device_map: one decoder layer lives on disk, the rest on the CPU."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "model")
    placement = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                 "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=placement,
                                                 offload_folder=tmp_path / "offload", dtype=torch.float32).eval()
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    data = batches_of(random_samples(6, seed=12), 3)
    _close(fimlora.calibrate(tiny_llama(), data, num_batches=2, progress=False),
           fimlora.calibrate(model, data, num_batches=2, progress=False))

class Int8Linear(nn.Module):
    """A stand-in for quantized linears (bitsandbytes, GPTQ, ...): int8 weight, dequantized per call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("weight", (linear.weight.detach() / scale).round().to(torch.int8))
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale

    def forward(self, x):
        return F.linear(x, self.dequantized().to(x.dtype))


def _quantize_mlps(model):
    for layer in model.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(layer.mlp, name, Int8Linear(getattr(layer.mlp, name)))
    return model


def test_quantized_wrapper_layers_are_calibrated_in_place():
    data = batches_of(random_samples(6, seed=13), 3)
    quantized = _quantize_mlps(tiny_llama())
    reference = tiny_llama()  # the same model with the dequantized weights as plain linears
    for layer, qlayer in zip(reference.model.layers, quantized.model.layers, strict=True):
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.mlp, name).weight.data.copy_(getattr(qlayer.mlp, name).dequantized())
    result = fimlora.calibrate(quantized, data, num_batches=2, progress=False)
    assert "model.layers.0.mlp.up_proj" in result.stats
    _close(fimlora.calibrate(reference, data, num_batches=2, progress=False), result)
    assert quantized.model.layers[0].mlp.up_proj.weight.dtype == torch.int8  # nothing was dequantized for good


def test_compiled_model_is_calibrated_through_its_eager_module():
    """torch.compile wraps the model; the probe needs eager hooks, and a few calibration batches
    gain nothing from compiling, so the eager module inside is calibrated (names without _orig_mod)."""
    data = batches_of(random_samples(6, seed=12), 3)
    eager = tiny_llama()
    compiled = torch.compile(eager)
    _close(fimlora.calibrate(tiny_llama(), data, num_batches=2, progress=False),
           fimlora.calibrate(compiled, data, num_batches=2, progress=False))
    fisher = fimlora.full_fisher(compiled, data, num_batches=1, progress=False)
    assert "model.layers.0.mlp.up_proj" in fisher

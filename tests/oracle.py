"""Independent float64 references, and the one comparison the tests use.

- ``oracle_grads``: a per-sample loop over PEFT's own LoRA layers. Each sample runs alone (no
  padding, batch of one) through a float64 copy of the model wrapped by PEFT with the same A as
  the calibration, B = 0; the loss is written out plainly here and lora_B.grad is read after
  each backward. Nothing from fimlora's engine is used.
- ``op_oracle``: the accumulate op's per-sample gradients, one plain loop step per token;
  ``sample_sq_oracle`` their squared Frobenius norms (what the op keeps per sample).
- ``relative_error``: normwise relative error naming its worst element; ``assert_stats``
  checks a LayerStats with it.

Test helpers only: this folder is not part of the fimlora package.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from fimlora import draw_calibration_a


def per_sample_loss(model, input_ids, label, task):
    if task == "causal-lm":
        # no KV cache, as in calibration (a decoder layer reused in one forward would append to its own cache)
        logits = model(input_ids=input_ids[None], use_cache=False).logits[0]
        return F.cross_entropy(logits[:-1], input_ids[1:])  # mean over this sample's own tokens
    if task == "seq2seq-lm":  # label: the target ids; the decoder reads them shifted right, the model's own way
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder_input_ids = base.prepare_decoder_input_ids_from_labels(labels=label[None])
        logits = model(input_ids=input_ids[None], decoder_input_ids=decoder_input_ids).logits[0]
        return F.cross_entropy(logits, label)
    logits = model(input_ids=input_ids[None]).logits[0]
    return F.cross_entropy(logits[None], label.view(1))


def oracle_grads(model, samples, names, *, rank, alpha, seed=0, task="causal-lm", dtype=torch.float64):
    """Per-sample B gradients {name: (N, d_out, r)} for ``samples`` = [(ids, label)], in ``dtype``
    (float64 by default; None keeps the model's own precision, for quantized models that have no
    float64 form)."""
    from peft import LoraConfig, get_peft_model

    reference = copy.deepcopy(model)
    if dtype is not None:
        reference = reference.to(dtype)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(names), lora_dropout=0.0)
    peft_model = get_peft_model(reference, config)
    peft_model.eval()
    layers = {name: peft_model.base_model.model.get_submodule(name) for name in names}
    for name, layer in layers.items():
        with torch.no_grad():
            a = layer.lora_A["default"].weight
            a.copy_(draw_calibration_a(name, layer.in_features, rank, seed).to(a.dtype))
    grads = {name: [] for name in names}
    for ids, label in samples:
        peft_model.zero_grad()
        per_sample_loss(peft_model, ids, label, task).backward()
        for name, layer in layers.items():
            grads[name].append(layer.lora_B["default"].weight.grad.detach().double())
    return {name: torch.stack(g) for name, g in grads.items()}


def moments(grads: torch.Tensor) -> dict[str, torch.Tensor]:
    mean = grads.mean(dim=0)
    variance = grads.var(dim=0, unbiased=False)
    return {"mean": mean, "variance": variance, "fisher": grads.square().mean(dim=0)}


class RelativeError(float):
    """A normwise relative error, max |actual - expected| / max |expected|, that names its worst
    element: pytest's assertion report (``assert err < tol``) and f"{err!r}" show where it is."""

    index: tuple[int, ...] | None = None
    actual: float = 0.0
    expected: float = 0.0
    scale: float = 0.0

    def __repr__(self) -> str:
        if self.index is None:
            return f"{float(self):.3g} (no elements)"
        return (f"{float(self):.3g} (worst element {self.index}: actual {self.actual:.9g}, expected {self.expected:.9g}, "
                f"|difference| {abs(self.actual - self.expected):.3g}, max|expected| {self.scale:.3g})")

    __str__ = __repr__


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> RelativeError:
    """max |actual - expected| / max |expected| (normwise, so tiny elements do not dominate), in
    float64 on the CPU, naming the element with the largest difference."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected shape {tuple(expected.shape)}")
    if actual.numel() == 0:
        return RelativeError(0.0)
    difference = (actual - expected).abs()
    flat = int(difference.flatten().nan_to_num(float("inf")).argmax())  # a NaN is the worst of all
    scale = float(expected.abs().max().clamp_min(1e-300))
    error = RelativeError(float(difference.flatten()[flat]) / scale)
    error.index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), difference.shape))
    error.actual, error.expected, error.scale = float(actual.flatten()[flat]), float(expected.flatten()[flat]), scale
    return error


def op_oracle(dy: torch.Tensor, h: torch.Tensor, segments: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-sample B gradients (S, d_out, r) of the accumulate op, in float64, one loop step a sample."""
    grads = []
    for start, end in segments.tolist():
        g = torch.zeros(dy.shape[1], h.shape[1], dtype=torch.float64)
        for t in range(start, end):
            g += torch.outer(dy[t].double().cpu(), h[t].double().cpu())
        grads.append(g * scale)
    return torch.stack(grads) if grads else torch.zeros(0, dy.shape[1], h.shape[1], dtype=torch.float64)


def sample_sq_oracle(grads: torch.Tensor) -> torch.Tensor:
    """Each per-sample gradient's squared Frobenius norm ||G_n||^2, float64 (M,), from (M, d_out, r)."""
    return grads.double().square().sum(dim=(1, 2))


def assert_stats(state, expected, tol: float, what: str = "stats") -> None:
    """A LayerStats' count, mean, variance and fisher against ``expected``: per-sample gradients
    (M, d_out, r) (e.g. from op_oracle) or another LayerStats; each within ``tol`` normwise.
    A state that keeps per-sample norms (track_samples) has them checked too (``assert_sample_sq``)."""
    if isinstance(expected, torch.Tensor):
        count, reference = expected.shape[0], moments(expected)
    else:
        count, reference = expected.count, _moments_of(expected)
    assert state.count == count, f"{what}: count {state.count}, expected {count}"
    for key, actual in _moments_of(state).items():
        error = relative_error(actual, reference[key])
        assert error <= tol, f"{what} {key}: relative error {error!r} > {tol:g}"
    if getattr(state, "track_samples", False):
        expected_sq = sample_sq_oracle(expected) if isinstance(expected, torch.Tensor) else expected.sample_sq()
        assert_sample_sq(state, expected_sq, tol, what)


def assert_sample_sq(state, expected_sq: torch.Tensor, tol: float, what: str = "stats") -> RelativeError:
    """A tracking LayerStats' per-sample squared norms against ``expected_sq`` (M,) within ``tol``
    normwise, and their per-element mean (``sample_sq_norms``) against its own fisher score; returns
    the error."""
    error = relative_error(state.sample_sq(), expected_sq)
    assert error <= tol, f"{what} per-sample squared norms: relative error {error!r} > {tol:g}"
    norms = state.sample_sq_norms()
    assert norms.dtype == torch.float64 and norms.shape == (state.count,)
    if state.count:
        # mean_n ||G_n||^2 / numel is the fisher score, computed from the moments instead (the
        # same float32 gradients: agreement to float32 rounding, whatever the inputs' precision)
        fisher = state.score("fisher")
        assert abs(float(norms.mean()) - fisher) <= 2e-5 * abs(fisher) + 1e-30, (
            f"{what}: mean of the per-sample norms {float(norms.mean())!r} != fisher score {fisher!r}")
    return error


def _moments_of(state) -> dict[str, torch.Tensor]:
    return {"mean": state.mean, "variance": state.variance(), "fisher": state.fisher()}

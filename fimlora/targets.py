"""Which layers get calibrated: PEFT-style suffix names, a regex, or "all-linear"."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import torch
from torch import nn

# Heads that are trained from scratch (or are the vocabulary projection) are never LoRA targets.
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")
# A PEFT-wrapped model prefixes every module name with this; plans speak of the base model's names.
_PEFT_PREFIX = "base_model.model."
# FSDP (v1) and activation-checkpoint wrappers insert these components into module names.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and its kin): a linear layer whose weight is stored (d_in, d_out)."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
    )


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, transformers' Conv1D, or any module with integer in_features/out_features and a
    2-D weight (PEFT's "all-linear" also takes Linear and Conv1D)."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return True
    weight = getattr(module, "weight", None)
    return (
        isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
    )


def is_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer (the wrapper around a base layer), without importing peft."""
    return hasattr(module, "lora_A") and hasattr(module, "scaling") and hasattr(module, "base_layer")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The eager model inside DDP and torch.compile wrappers: DDP adds nothing to a forward whose
    parameters are all frozen, and a compiled graph would trace (and break on) the probe's hooks;
    calibration's few batches gain nothing from compilation."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def plan_name(name: str) -> str:
    """The module's name relative to the base model (without PEFT, FSDP or checkpoint wrappers)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer that could be a target, by full name in ``model``.

    In a PEFT model the LoRA layers themselves are the candidates (their own A and scale are
    used); the linears inside them (base_layer, lora_A, lora_B) are not.
    """
    modules = list(model.named_modules())
    lora_layers = {name: module for name, module in modules if is_lora_layer(module)}
    if lora_layers:
        return lora_layers
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: module for name, module in modules
        if name and is_linear_like(module) and module is not output_head
        and not any(part in _HEAD_NAMES for part in name.split("."))
    }


def _matches(name: str, targets: re.Pattern | Sequence[str] | None) -> bool:
    """None is "all-linear"; a pattern must match the whole name; names match as suffixes (PEFT)."""
    if targets is None:
        return True
    if isinstance(targets, re.Pattern):
        return targets.fullmatch(name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def target_pattern(targets: str) -> re.Pattern:
    """A regex ``targets`` compiled, or a ValueError naming it and what is wrong with it."""
    try:
        return re.compile(targets)
    except re.error as error:
        raise ValueError(f"targets regex {targets!r} is not a valid regular expression ({error}); "
                         "fix it, e.g. r'.*\\.(q_proj|v_proj)'") from None


def find_targets(model: nn.Module, targets: str | Sequence[str] = "all-linear") -> dict[str, nn.Module]:
    """The target layers, in model order. Raises if nothing matches, listing what exists."""
    if not isinstance(targets, str) and (not targets or not all(isinstance(t, str) for t in targets)):
        raise ValueError(f"targets must be 'all-linear', a regex string or a non-empty list of names; got {targets!r}")
    wanted = (None if targets == "all-linear" else target_pattern(targets)) if isinstance(targets, str) else targets
    candidates = candidate_layers(model)
    found = {name: module for name, module in candidates.items() if _matches(plan_name(name), wanted)}
    if not found:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in candidates})
        shown = ", ".join(suffixes) if suffixes else "(none: the model has no linear layers)"
        raise ValueError(f"targets={targets!r} matched no linear layer; linear layers in this model end with: {shown}")
    return found


def layer_device(module: nn.Module) -> torch.device:
    """Where the layer computes: the execution device of an offloaded layer (accelerate keeps
    its weights on the meta device between calls), else its weight's device."""
    hook = getattr(module, "_hf_hook", None)
    execution_device = getattr(hook, "execution_device", None)
    if execution_device is not None:
        return torch.device(execution_device if not isinstance(execution_device, int) else f"cuda:{execution_device}")
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    if tensor is None or tensor.device.type == "meta":
        return torch.device("cpu")
    return tensor.device


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear-like or PEFT LoRA layer."""
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.nf)
    return int(module.in_features), int(module.out_features)

"""Plain-PyTorch implementation of the accumulate op: the reference the fused backends are
tested against. It forms each sample's B gradient with one matmul per segment (so it does
materialise the (S, d_out, r) per-sample tensor, which is small for LoRA ranks) and folds
them into the running moments with Chan's update."""

from __future__ import annotations

import torch

from ..stats import LayerStats

name = "torch"


def available(device=None) -> tuple[bool, str]:
    return True, "plain PyTorch, always available"


def accumulate(dy: torch.Tensor, h: torch.Tensor, segments: torch.Tensor, scale: float, state: LayerStats) -> None:
    """Fold the per-sample gradients of one batch into ``state`` (inputs checked by the dispatcher)."""
    compute = state.mean.dtype
    bounds = segments.tolist()
    grads = torch.empty(len(bounds), dy.shape[1], h.shape[1], dtype=compute, device=dy.device)
    for i, (start, end) in enumerate(bounds):
        # G_n = s * sum_t dy_t h_t^T over the tokens of sample n
        torch.matmul(dy[start:end].T.to(compute), h[start:end].to(compute), out=grads[i])
    grads.mul_(scale)
    state.update_(grads)

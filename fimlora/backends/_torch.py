"""Plain-PyTorch implementation of the accumulate op: the reference the fused backends are
tested against. It forms each sample's B gradient with one matmul per segment (so it does
materialise the (S, d_out, r) per-sample tensor, which is small for LoRA ranks) and folds
them into the running moments with Chan's update; each sample's squared norm, when asked
for, is one more reduction over that tensor."""

from __future__ import annotations

import torch

from ..stats import LayerStats

name = "torch"


def available(device=None) -> tuple[bool, str]:
    return True, "plain PyTorch, always available"


def accumulate(
    dy: torch.Tensor,
    h: torch.Tensor,
    segments: torch.Tensor,
    scale: float,
    state: LayerStats,
    sample_sq: torch.Tensor | None = None,
) -> None:
    """Fold the per-sample gradients of one batch into ``state``, and write each sample's
    ||G_n||^2 to ``sample_sq`` (S,) float32 when given (inputs checked by the dispatcher)."""
    compute = state.mean.dtype
    bounds = segments.tolist()
    grads = torch.empty(len(bounds), dy.shape[1], h.shape[1], dtype=compute, device=dy.device)
    for i, (start, end) in enumerate(bounds):
        # G_n = s * sum_t dy_t h_t^T over the tokens of sample n
        torch.matmul(dy[start:end].T.to(compute), h[start:end].to(compute), out=grads[i])
    grads.mul_(scale)
    if sample_sq is not None:
        sample_sq.copy_(torch.linalg.vector_norm(grads, dim=(1, 2)).square_())  # no (S, d_out, r) temporary
    state.update_(grads)

"""Running per-sample gradient statistics of one LoRA-B matrix (DESIGN §2).

A ``LayerStats`` holds, for a layer with B of shape (d_out, r), the count M of per-sample
gradients seen so far, their elementwise mean and the sum of squared deviations M2. Batches
are folded in with Chan's parallel update, which stays accurate when the mean is much larger
than the spread (a plain sum of squares would cancel catastrophically).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .choices import GRANULARITIES, SCORES

__all__ = ["GRANULARITIES", "SCORES", "LayerStats"]


@dataclass
class LayerStats:
    count: int
    mean: torch.Tensor  # (d_out, r)
    m2: torch.Tensor  # (d_out, r), sum of squared deviations from the mean

    @classmethod
    def zeros(cls, d_out: int, r: int, *, device=None, dtype: torch.dtype = torch.float32) -> LayerStats:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"stats dtype must be torch.float32 or torch.float64, got {dtype}")
        return cls(0, torch.zeros(d_out, r, device=device, dtype=dtype), torch.zeros(d_out, r, device=device, dtype=dtype))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mean.shape)

    def variance(self) -> torch.Tensor:
        """Population variance M2 / M of each element (the paper's gradient variance)."""
        return self.m2 / max(self.count, 1)

    def fisher(self) -> torch.Tensor:
        """Uncentred second moment (1/M) sum_n G_n^2: the empirical Fisher diagonal."""
        return self.variance() + self.mean.square()

    def statistic(self, score: str) -> torch.Tensor:
        if score == "variance":
            return self.variance()
        if score == "fisher":
            return self.fisher()
        raise ValueError(f"score={score!r} is not known; use one of {SCORES}")

    def score(self, score: str = "variance") -> float:
        """One importance number per layer: the mean of the chosen statistic over all elements."""
        return float(self.statistic(score).double().mean())

    def merge_moments_(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Chan et al.'s merge of a group of ``count`` gradients with moments (mean, m2), in place."""
        if count == 0:
            return
        total = self.count + count
        delta = mean.to(self.mean.dtype) - self.mean
        self.m2.add_(m2.to(self.m2.dtype)).add_(delta.square(), alpha=self.count * count / total)
        self.mean.add_(delta, alpha=count / total)
        self.count = total

    def update_(self, grads: torch.Tensor) -> None:
        """Fold per-sample gradients ``grads`` of shape (S, d_out, r) into the running moments."""
        if grads.shape[0] == 0:
            return
        grads = grads.to(self.mean.dtype)
        batch_mean = grads.mean(dim=0)
        batch_m2 = (grads - batch_mean).square_().sum(dim=0)
        self.merge_moments_(grads.shape[0], batch_mean, batch_m2)

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.mean).all() and torch.isfinite(self.m2).all())

    def summary(self) -> dict[str, float]:
        """Small JSON-able digest for the rank plan."""
        return {
            "count": self.count,
            "variance": self.score("variance"),
            "fisher": self.score("fisher"),
            "mean_sq": float(self.mean.double().square().mean()),
        }

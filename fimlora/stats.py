"""Running per-sample gradient statistics of one LoRA-B matrix (DESIGN §2).

A ``LayerStats`` holds, for a layer with B of shape (d_out, r), the count M of per-sample
gradients seen so far, their elementwise mean and the sum of squared deviations M2. Batches
are folded in with Chan's parallel update, which stays accurate when the mean is much larger
than the spread (a plain sum of squares would cancel catastrophically).

With ``track_samples=True`` it also keeps one float32 scalar per gradient: its squared Frobenius
norm ||G_n||^2, written by the accumulate op (``fimlora.backends.accumulate``) into a growing
buffer in the order the gradients arrive. From these and the mean term mean(Gbar^2) the scores
of any resampled set of samples follow (``fimlora.confidence``): 4 bytes per sample and layer
(the buffer starts at the first batch's size and doubles, so at most twice that is reserved;
k equal batches fill it exactly when k is a power of two, e.g. the default 8).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .choices import GRANULARITIES, SCORES

__all__ = ["GRANULARITIES", "SCORES", "LayerStats"]


@dataclass
class LayerStats:
    count: int
    mean: torch.Tensor  # (d_out, r)
    m2: torch.Tensor  # (d_out, r), sum of squared deviations from the mean
    # keep each gradient's squared norm (filled by fimlora.backends.accumulate; see the module doc)
    track_samples: bool = False
    _sample_buffer: torch.Tensor | None = field(default=None, init=False, repr=False)
    _samples: int = field(default=0, init=False, repr=False)  # slots of the buffer in use

    @classmethod
    def zeros(
        cls, d_out: int, r: int, *, device=None, dtype: torch.dtype = torch.float32, track_samples: bool = False
    ) -> LayerStats:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"stats dtype must be torch.float32 or torch.float64, got {dtype}")
        return cls(0, torch.zeros(d_out, r, device=device, dtype=dtype), torch.zeros(d_out, r, device=device, dtype=dtype),
                   track_samples=track_samples)

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

    # ---- per-sample squared norms (track_samples) -------------------------------------------

    @property
    def num_sample_norms(self) -> int:
        """How many per-sample squared norms are kept (equal to ``count`` while tracking)."""
        return self._samples

    def sample_sq(self) -> torch.Tensor:
        """Each gradient's squared Frobenius norm ||G_n||^2, float32 (M,), on the state's device,
        in the order the gradients were folded in (distributed: rank 0's, then rank 1's, ...).
        A view of the buffer: copy it to keep it past later updates."""
        self._check_tracked()
        return self._kept_sample_sq()

    def sample_sq_norms(self) -> torch.Tensor:
        """q_n = ||G_n||^2 / (d_out r) per gradient: float64 (M,) on the CPU. Their mean is the
        ``fisher`` score; with ``mean_sq()`` they give any resampled set's scores (fimlora.confidence)."""
        return self.sample_sq().double().cpu() / max(self.mean.numel(), 1)

    def mean_sq(self) -> float:
        """The mean term mean(Gbar^2) over the elements: fisher score - variance score."""
        return float(self.mean.double().square().mean())

    def add_sample_sq_(self, values: torch.Tensor) -> None:
        """Append squared norms (one per gradient folded in by other means than the op)."""
        values = values.detach().flatten()
        with self.sample_sq_slots(values.numel()) as slots:
            slots.copy_(values)

    def set_sample_sq_(self, values: torch.Tensor) -> None:
        """Replace every kept squared norm with ``values`` (the distributed gather does this)."""
        values = values.detach().flatten().to(self.mean.device, torch.float32)
        self._sample_buffer, self._samples = values.clone(), values.numel()

    @contextlib.contextmanager
    def sample_sq_slots(self, n: int) -> Iterator[torch.Tensor]:
        """The next ``n`` free slots, float32 (n,) contiguous, for an op to write squared norms into.

        They count as kept only when the block exits without an exception: a failed op adds no
        half-written norms."""
        slots = self._reserve_sample_sq(n)
        yield slots
        self._samples += n

    def _reserve_sample_sq(self, n: int) -> torch.Tensor:
        """The next ``n`` free slots, growing the buffer by doubling (amortised O(1) per norm)."""
        needed = self._samples + n
        capacity = 0 if self._sample_buffer is None else self._sample_buffer.numel()
        if n == 0:
            return self.mean.new_empty(0, dtype=torch.float32)
        if needed > capacity:
            grown = torch.empty(max(needed, 2 * capacity), dtype=torch.float32, device=self.mean.device)
            if self._samples:
                grown[: self._samples].copy_(self._sample_buffer[: self._samples])
            self._sample_buffer = grown
        return self._sample_buffer[self._samples : needed]

    def _kept_sample_sq(self) -> torch.Tensor:
        """The kept norms, without the checks of ``sample_sq`` (for merges in progress)."""
        if self._sample_buffer is None:
            return self.mean.new_zeros(0, dtype=torch.float32)
        return self._sample_buffer[: self._samples]

    def _check_tracked(self) -> None:
        if not self.track_samples:
            raise RuntimeError("these statistics keep no per-sample norms; calibrate with confidence=True "
                               "(or LayerStats.zeros(..., track_samples=True))")
        if self._samples != self.count:
            raise RuntimeError(f"the per-sample norms cover {self._samples} of the {self.count} gradients "
                               "(moments were merged without their norms)")

    def nbytes(self) -> int:
        """Bytes held: mean and M2, plus the per-sample buffer (its reserved size) when tracking."""
        held = self.mean.numel() * self.mean.element_size() + self.m2.numel() * self.m2.element_size()
        return held + (0 if self._sample_buffer is None else self._sample_buffer.numel() * 4)

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

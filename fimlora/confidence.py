"""How sure is the rank map? A bootstrap over calibration samples, from one number per sample and layer.

For every layer the calibration keeps, besides (count, mean, M2), each sample's squared gradient
norm per element, q_n = ||G_n||^2 / (d_out r). From those alone the scores of any resampled
set of samples follow without the per-sample gradients:

    fisher*   = sum_n w_n q_n / sum_n w_n
    variance* = fisher* - mean(Gbar^2)          (the mean term held at its full-sample value)

where w_n counts how often sample n was drawn. Holding the mean term fixed ignores its own
sampling noise, which is small whenever the mean gradient sits near its noise floor (the usual
case for calibration batches: variance and fisher scores then agree); it is what one scalar per
sample can support. Each resample's scores go through the same allocator as the plan, which
gives a rank interval per layer and one stability figure for the map.

A map is *flat* when the layers cannot be told apart beyond their uncertainty: Cochran's Q over
the log scores, with each layer's standard error from the bootstrap, does not reject equal
scores. It is *unstable* when more than a given share of layers has a rank interval wider than
one rank step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_RESAMPLES = 200
DEFAULT_LEVEL = 0.9
# A map is stable when at most this share of layers has a rank interval wider than one step. A
# convention, not a fitted value: a quarter of the layers moving by two or more steps across
# resamples is where a map stops being reproducible in any useful sense.
MAX_UNSTABLE_SHARE = 0.25
FLAT_ALPHA = 0.05


@dataclass(frozen=True)
class LayerInterval:
    score_lo: float
    score_hi: float
    rank_lo: int
    rank_hi: int


@dataclass(frozen=True)
class MapConfidence:
    """Per-layer intervals and the map's stability, at ``level`` over ``resamples`` bootstrap draws."""

    layers: dict[str, LayerInterval]
    expected_rank_change: float  # mean over layers of E|rank* - rank|, in ranks
    unstable_share: float  # share of layers whose rank interval spans more than one step
    flat_p: float  # p-value of "every layer has the same score" (Cochran's Q on log scores)
    samples: int
    resamples: int
    level: float
    seed: int

    @property
    def stable(self) -> bool:
        return self.unstable_share <= MAX_UNSTABLE_SHARE

    @property
    def flat(self) -> bool:
        return not self.flat_p < FLAT_ALPHA

    def verdict(self) -> str:
        """One line for the user: can the map be trusted, and if not, why."""
        if self.flat:
            return (f"flat: the layers' scores do not differ beyond their uncertainty (p = {self.flat_p:.2f} "
                    f"for equal scores over {self.samples} samples); the allocation is not supported by the data")
        if not self.stable:
            return (f"unstable: {self.unstable_share:.0%} of layers have a rank interval wider than one step "
                    f"(expected rank change {self.expected_rank_change:.2f} per layer); calibrate on more samples")
        return (f"stable: {self.unstable_share:.0%} of layers have a rank interval wider than one step "
                f"(expected rank change {self.expected_rank_change:.2f} per layer over {self.samples} samples)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = {name: asdict(iv) for name, iv in self.layers.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> MapConfidence:
        layers = {name: LayerInterval(**iv) for name, iv in d["layers"].items()}
        return cls(**{**d, "layers": layers})


def resample_weights(num_samples: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, num_samples) multinomial counts: each row is one bootstrap draw of the samples."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_samples, size=(resamples, num_samples))
    weights = np.zeros((resamples, num_samples))
    np.add.at(weights, (np.arange(resamples)[:, None], draws), 1.0)
    return weights


def bootstrap_scores(per_sample: np.ndarray, mean_term: np.ndarray, score: str, weights: np.ndarray) -> np.ndarray:
    """(resamples, layers) scores from ``per_sample`` (samples, layers) squared norms per element."""
    fisher = weights @ per_sample / weights.sum(axis=1, keepdims=True)
    if score == "fisher":
        return fisher
    if score == "variance":
        return np.maximum(fisher - mean_term[None, :], 0.0)
    raise ValueError(f"score={score!r} is not known; use 'variance' or 'fisher'")


def chi2_sf(q: float, df: int) -> float:
    """P(chi2_df > q) by the Wilson-Hilferty cube-root normal approximation (no scipy needed;
    within ~0.005 of the exact tail at the 5% level for df >= 3, i.e. a map of 4 or more layers)."""
    if q <= 0:
        return 1.0
    k = 2.0 / (9.0 * df)
    z = ((q / df) ** (1.0 / 3.0) - (1.0 - k)) / math.sqrt(k)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def flatness_p(scores: np.ndarray, draws: np.ndarray) -> float:
    """Cochran's Q test of equal log scores, each layer's standard error from the bootstrap draws."""
    floor = np.finfo(float).tiny
    log_s = np.log(np.maximum(scores, floor))
    se = np.log(np.maximum(draws, floor)).std(axis=0, ddof=1)
    if scores.size < 2:
        return 1.0
    if np.any(se <= 0):
        # a layer known exactly: any difference from the others is real, none means flat
        return 1.0 if np.ptp(log_s) == 0 else 0.0
    w = 1.0 / se**2
    pooled = float((w * log_s).sum() / w.sum())
    q = float((w * (log_s - pooled) ** 2).sum())
    return chi2_sf(q, scores.size - 1)


def map_confidence(
    names: Sequence[str],
    per_sample: np.ndarray,
    mean_term: np.ndarray,
    ranks: Sequence[int],
    allocate: Callable[[Sequence[float]], Sequence[int]],
    *,
    score: str = "variance",
    step: int = 1,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> MapConfidence:
    """Bootstrap the calibration samples: score and rank intervals per layer, the map's stability.

    ``per_sample`` is (samples, layers) of ||G_n||^2 / numel, ``mean_term`` the per-element mean
    of the squared mean gradient per layer, ``ranks`` the plan's ranks and ``allocate`` the plan's
    allocator (scores -> ranks). Seeded and deterministic."""
    per_sample = np.asarray(per_sample, dtype=float)
    mean_term = np.asarray(mean_term, dtype=float)
    n = per_sample.shape[0]
    if per_sample.ndim != 2 or per_sample.shape[1] != len(names):
        raise ValueError(f"per_sample has shape {per_sample.shape}; want (samples, {len(names)})")
    if n < 2:
        raise ValueError(f"a bootstrap needs at least 2 calibration samples, got {n}; calibrate on more data")
    weights = resample_weights(n, resamples, seed)
    draws = bootstrap_scores(per_sample, mean_term, score, weights)
    full = bootstrap_scores(per_sample, mean_term, score, np.ones((1, n)))[0]
    rank_draws = np.array([list(allocate(row.tolist())) for row in draws], dtype=float)
    tail = (1 - level) / 2
    s_lo, s_hi = np.quantile(draws, [tail, 1 - tail], axis=0)
    r_lo, r_hi = np.quantile(rank_draws, [tail, 1 - tail], axis=0, method="inverted_cdf")
    planned = np.asarray(ranks, dtype=float)
    layers = {
        name: LayerInterval(float(s_lo[i]), float(s_hi[i]), int(r_lo[i]), int(r_hi[i]))
        for i, name in enumerate(names)
    }
    return MapConfidence(
        layers=layers,
        expected_rank_change=float(np.abs(rank_draws - planned[None, :]).mean()),
        unstable_share=float(((r_hi - r_lo) > step).mean()),
        flat_p=flatness_p(full, draws),
        samples=n,
        resamples=resamples,
        level=level,
        seed=seed,
    )


def memory_bytes(num_layers: int, num_samples: int, itemsize: int = 4) -> int:
    """Bytes the per-sample squared norms take: one scalar per sample and layer."""
    return num_layers * num_samples * itemsize


def of_statistics(stats: Mapping, names: Sequence[str], ranks: Sequence[int],
                  allocate: Callable[[Sequence[float]], Sequence[int]], *, score: str, step: int, seed: int,
                  resamples: int = DEFAULT_RESAMPLES) -> MapConfidence | None:
    """The map's confidence from calibrated ``LayerStats`` that kept their per-sample norms; None when
    they did not (``calibrate(confidence=False)``), or the layers saw different sample counts."""
    kept = [stats[name] for name in names]
    if not all(getattr(s, "track_samples", False) for s in kept):
        return None
    counts = {s.num_sample_norms for s in kept}
    if len(counts) != 1 or counts.pop() < 2:
        return None
    per_sample = np.stack([s.sample_sq_norms().numpy() for s in kept], axis=1)
    mean_term = np.array([s.mean_sq() for s in kept])
    return map_confidence(names, per_sample, mean_term, ranks, allocate, score=score, step=step,
                          resamples=resamples, seed=seed)

"""Statistics for the quality study: per-cell summaries, paired CIs against uniform, rank agreement."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from itertools import combinations


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean of the paired differences a_i - b_i with a two-sided t confidence interval.

    Pairs share a seed (same data order, head and LoRA-A stream), so the seed-to-seed variation
    that both methods share cancels. Returns mean, std, n, low, high and the t-test p-value.
    """
    from scipy.stats import t

    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_ci needs two equal-length samples of at least 2; got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean, sd = mean_std(d)
    half = t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    return {"mean": mean, "std": sd, "n": n, "low": mean - half, "high": mean + half, "p": p}


def agreement(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(Spearman rho, Kendall tau-b) of two score or rank maps over the same layers.

    A map with no spread (all ranks equal) has no order to agree with: NaN is returned."""
    from scipy.stats import kendalltau, spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan, math.nan
    return float(spearmanr(x, y).statistic), float(kendalltau(x, y).statistic)


def pairwise_agreement(maps: Sequence[Sequence[float]]) -> dict[str, float]:
    """Mean and minimum Spearman/Kendall over all pairs of maps."""
    pairs = [agreement(a, b) for a, b in combinations(maps, 2)]
    rhos = [p[0] for p in pairs if not math.isnan(p[0])]
    taus = [p[1] for p in pairs if not math.isnan(p[1])]
    nan = math.nan
    return {"pairs": len(pairs), "spearman_mean": statistics.fmean(rhos) if rhos else nan,
            "spearman_min": min(rhos) if rhos else nan, "kendall_mean": statistics.fmean(taus) if taus else nan,
            "kendall_min": min(taus) if taus else nan}

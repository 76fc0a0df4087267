"""Paired statistics for the study: method minus uniform on the same (task, seed, budget).

Three views of one comparison, all in score points:
- t interval over the paired differences (seeds, and tasks x seeds when pooled);
- a paired bootstrap that resamples seeds *and* dev examples (the dev sets are small: 0.5
  points of SST-2 accuracy is 4 examples), so the interval also carries test-set noise;
- the minimum detectable effect (80% power, two-sided, at the corrected level) of the design.
Holm's step-down correction is applied over the comparisons of one table.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from scipy import stats as sps


@dataclass
class Paired:
    label: str
    diffs: list[float]
    mean: float
    sd: float
    lo: float
    hi: float
    p: float
    boot_lo: float = math.nan
    boot_hi: float = math.nan
    p_holm: float = math.nan
    mde: float = math.nan

    @property
    def n(self) -> int:
        return len(self.diffs)


def t_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float, float]:
    """(mean, sd, lo, hi, two-sided p) of a paired t test; degenerate inputs give nan bounds."""
    n = len(diffs)
    mean = sum(diffs) / n if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan, math.nan, math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0:
        return mean, 0.0, mean, mean, 1.0 if mean == 0 else 0.0
    half = sps.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    p = 2 * sps.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1)
    return mean, sd, mean - half, mean + half, float(p)


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a paired t test of n pairs detects with ``power`` at ``alpha``."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    df = n - 1
    return (sps.t.ppf(1 - alpha / 2, df) + sps.t.ppf(power, df)) * sd / math.sqrt(n)


def paired_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Exact power of a two-sided paired t test of n pairs for a true mean difference ``effect``."""
    if n < 2 or not sd > 0:
        return math.nan
    df, shift = n - 1, effect / (sd / math.sqrt(n))
    crit = sps.t.ppf(1 - alpha / 2, df)
    return float(sps.nct.sf(crit, df, shift) + sps.nct.cdf(-crit, df, shift))


def seeds_needed(effect: float, sd: float, alpha: float = 0.05, power: float = 0.8, most: int = 1000) -> int | None:
    """Fewest pairs whose paired t test detects ``effect`` with ``power`` (None past ``most``)."""
    if not (math.isfinite(sd) and sd > 0):
        return None
    for n in range(2, most + 1):
        if paired_power(effect, sd, n, alpha) >= power:
            return n
    return None


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (nan stays nan and does not count)."""
    finite = sorted((p, i) for i, p in enumerate(pvalues) if math.isfinite(p))
    m = len(finite)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


Scorer = Callable[[Sequence[int], Sequence[int]], float]


def paired_bootstrap(pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int], Scorer]],
                     *, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of mean(score(method) - score(uniform)) over resampled pairs and examples.

    ``pairs``: one (method predictions, uniform predictions, gold, scorer) per (task, seed). Each
    resample draws pairs with replacement, then dev examples with replacement within each drawn
    pair (the same examples for both arms, so the comparison stays paired)."""
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        total = 0.0
        for _ in range(len(pairs)):
            method, uniform, gold, scorer = pairs[rng.randrange(len(pairs))]
            idx = [rng.randrange(len(gold)) for _ in range(len(gold))]
            g = [gold[i] for i in idx]
            total += scorer([method[i] for i in idx], g) - scorer([uniform[i] for i in idx], g)
        means.append(total / len(pairs))
    means.sort()
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


def compare(label: str, diffs: Sequence[float]) -> Paired:
    mean, sd, lo, hi, p = t_interval(list(diffs))
    return Paired(label, list(diffs), mean, sd, lo, hi, p)


def correct(rows: list[Paired], alpha: float = 0.05) -> list[Paired]:
    """Holm-adjusted p-values and the MDE at the Bonferroni level alpha / m (conservative)."""
    adjusted = holm([r.p for r in rows])
    m = max(1, sum(math.isfinite(r.p) for r in rows))
    for row, p in zip(rows, adjusted, strict=True):
        row.p_holm = p
        row.mde = minimum_detectable_effect(row.sd, row.n, alpha / m)
    return rows

"""Integer LoRA ranks per layer from importance scores: proportional, monotone, never over budget.

Rounding leftovers are handed out greedily so that as little budget is wasted as the integers allow.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real
from typing import Any

import numpy as np

from .plan import BUDGET_KINDS

__all__ = ["Budget", "allocate", "min_budget"]

_PARSE_HELP = ("use 'R' or 'mean:R' (the uniform rank R with the same parameter count, e.g. 8), "
               "'rank:N' (sum of ranks) or 'params:N' (trainable parameters)")
_SIG_DIGITS = 12  # normalised scores are rounded to this many digits (see _weights)
_NO_CAP = np.iinfo(np.int64).max // 4  # "no upper bound" as an int64 that cannot overflow in our sums


def _as_int(x: Any) -> int | None:
    """``x`` as an int if it is a whole number (int or integral float), else None."""
    if isinstance(x, bool) or not isinstance(x, Real):
        return None
    if isinstance(x, Integral):
        return int(x)
    return int(x) if math.isfinite(x) and float(x).is_integer() else None


@dataclass(frozen=True)
class Budget:
    """How many LoRA parameters (or ranks) to spend.

    ``kind`` is ``"mean_rank"`` (``value`` is the uniform rank whose parameter count is the budget),
    ``"rank"`` (``value`` is the sum of ranks) or ``"params"`` (``value`` is sum r_l * (d_in + d_out)).
    """

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"Budget.kind={self.kind!r} is unknown; use one of {', '.join(BUDGET_KINDS)}")
        v = self.value
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"Budget.value={v!r} must be a finite number > 0; pass a positive budget")
        if self.kind == "mean_rank":
            object.__setattr__(self, "value", float(v))
            return
        whole = _as_int(v)
        if whole is None:
            raise ValueError(f"Budget.value={v!r} must be a whole number for kind {self.kind!r}; round it")
        object.__setattr__(self, "value", whole)

    @classmethod
    def mean_rank(cls, r: float) -> Budget:
        """The parameter count of a uniform rank-``r`` adapter."""
        return cls("mean_rank", r)

    @classmethod
    def total_rank(cls, total: int) -> Budget:
        """A total number of ranks summed over layers."""
        return cls("rank", total)

    @classmethod
    def params(cls, total: int) -> Budget:
        """A total number of trainable LoRA parameters."""
        return cls("params", total)

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse the CLI syntax: ``8`` or ``mean:8``, ``rank:96``, ``params:120000``."""
        prefix, sep, number = text.strip().partition(":")
        if not sep:
            prefix, number = "mean", prefix
        kind = {"mean": "mean_rank", "rank": "rank", "params": "params"}.get(prefix.strip().lower())
        try:
            value = float(number)
        except ValueError:
            value = None
        if kind is None or value is None:
            raise ValueError(f"cannot parse budget {text!r}; {_PARSE_HELP}")
        try:
            return cls(kind, value)
        except ValueError as err:
            raise ValueError(f"cannot parse budget {text!r}: {err}") from None

    def resolve(self, shapes: Sequence[tuple[int, int]]) -> tuple[int, list[int]]:
        """Return ``(total, costs)`` for layers of the given ``(d_in, d_out)`` shapes.

        mean_rank r: costs d_in + d_out, total floor(r * sum(costs)); rank: costs all 1, total value;
        params: costs d_in + d_out, total value.
        """
        costs = []
        for i, shape in enumerate(shapes):
            dims = [_as_int(d) for d in shape]
            if len(dims) != 2 or any(d is None or d <= 0 for d in dims):
                raise ValueError(f"shapes[{i}]={tuple(shape)!r} must be two positive integers (d_in, d_out)")
            costs.append(dims[0] + dims[1])
        if not costs:
            raise ValueError("shapes is empty; pass one (d_in, d_out) per LoRA layer")
        if self.kind == "rank":
            return int(self.value), [1] * len(costs)
        if self.kind == "params":
            return int(self.value), costs
        # Exact decimal arithmetic: mean:0.57 over 100 parameters is 57, where 0.57 * 100 floors to 56.
        return math.floor(Fraction(repr(self.value)) * sum(costs)), costs

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``from_dict`` inverts it."""
        return {"kind": self.kind, "value": self.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Budget:
        """Inverse of ``to_dict``."""
        missing = [key for key in ("kind", "value") if key not in d]
        if missing:
            raise ValueError(f"budget dict lacks {', '.join(missing)}; expected {{'kind': ..., 'value': ...}}")
        return cls(d["kind"], d["value"])


def min_budget(costs: Sequence[int], r_min: int, multiple_of: int = 1) -> int:
    """Smallest total that gives every layer ``r_min`` (rounded up to ``multiple_of``)."""
    return -(-r_min // multiple_of) * multiple_of * sum(int(c) for c in costs)


def allocate(scores: Sequence[float], total: int, *, costs: Sequence[int] | None = None, r_min: int = 0,
             r_max: int | None = None, multiple_of: int = 1, temperature: float = 1.0) -> list[int]:
    """Integer ranks, one per score, with sum(rank * cost) <= total.

    Ranks lie in [r_min, r_max] (rounded inwards to multiples of ``multiple_of``), are monotone in
    score, and are proportional to ``(score / max score) ** temperature`` up to those clamps and
    integer rounding. Leftover budget is handed out greedily, largest shortfall first.
    """
    s, c, total, lo, hi, k = _validate(scores, total, costs, r_min, r_max, multiple_of, temperature)
    target = _continuous_target(_weights(s, temperature), c, total, lo, hi)
    # Guard against 1-ulp non-monotonicity from pow/clip: the fill relies on targets monotone in score.
    order = np.argsort(-s, kind="stable")
    target[order] = np.minimum.accumulate(target[order])
    start = (np.floor(target / k) * k).astype(np.int64)
    return _fill(target, start, s, c, total, k, hi)


def _validate(scores: Sequence[float], total: int, costs: Sequence[int] | None, r_min: int,
              r_max: int | None, multiple_of: int,
              temperature: float) -> tuple[np.ndarray, np.ndarray, int, int, int | None, int]:
    """Check every argument up front; return (scores, costs, total, lo, hi, k) normalised."""
    s = np.asarray(scores, dtype=float)
    if s.ndim != 1:
        raise ValueError(f"scores has shape {s.shape}; pass a flat sequence with one score per LoRA layer")
    if s.size == 0:
        raise ValueError("scores is empty (no layers); pass a flat sequence with one score per LoRA layer")
    bad = np.flatnonzero(~np.isfinite(s) | (s < 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"scores[{i}]={float(s[i])!r} must be finite and >= 0; fix or clamp it (e.g. NaN/negative -> 0)")
    if costs is None:
        c = np.ones(s.size, dtype=np.int64)
    else:
        if len(costs) != s.size:
            raise ValueError(f"costs has {len(costs)} entries but scores has {s.size}; pass one cost per layer")
        whole = [_as_int(x) for x in costs]
        for i, x in enumerate(whole):
            if x is None or x <= 0:
                raise ValueError(f"costs[{i}]={costs[i]!r} must be a positive integer (e.g. d_in + d_out)")
        c = np.asarray(whole, dtype=np.int64)
    k = _as_int(multiple_of)
    if k is None or k < 1:
        raise ValueError(f"multiple_of={multiple_of!r} must be an integer >= 1; use 1 for any rank")
    if _as_int(r_min) is None or r_min < 0:
        raise ValueError(f"r_min={r_min!r} must be an integer >= 0; use 0 to allow dropping layers")
    if r_max is not None and _as_int(r_max) is None:
        raise ValueError(f"r_max={r_max!r} must be an integer or None (no upper bound)")
    if not isinstance(temperature, Real) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be finite and >= 0; use 1 for proportional, 0 for uniform")
    lo = -(-int(r_min) // k) * k
    hi = None if r_max is None else int(r_max) // k * k
    if hi is not None and lo > hi:
        raise ValueError(f"r_min={r_min} rounds up to {lo} but r_max={r_max} rounds down to {hi} "
                         f"(multiple_of={k}); lower r_min or raise r_max")
    whole_total = _as_int(total)
    if whole_total is None:
        raise ValueError(f"total={total!r} must be a whole number of parameters (or ranks)")
    need = min_budget(c, lo)
    if whole_total < need:
        raise ValueError(f"budget total={whole_total} is infeasible: giving every layer r_min={lo} needs at "
                         f"least {need}; raise the budget to >= {need} or lower r_min")
    return s, c, whole_total, lo, hi, k


def _weights(scores: np.ndarray, temperature: float) -> np.ndarray:
    """(score / max) ** temperature; all-zero scores count as uniform."""
    top = scores.max()
    if top == 0:
        return np.ones_like(scores)
    # Scaling all scores perturbs score / max by an ulp; rounding removes that so the ranks are
    # exactly invariant to the scale (an ulp could otherwise flip a floor at an exact integer).
    norm = np.array([float(f"{x:.{_SIG_DIGITS}g}") for x in scores / top])
    return norm**temperature


def _continuous_target(w: np.ndarray, costs: np.ndarray, total: int, lo: int, hi: int | None) -> np.ndarray:
    """clip(lam * w, lo, hi) with lam chosen so that sum(costs * target) is total (never above)."""
    upper = math.inf if hi is None else float(hi)
    if hi is not None and hi * int(costs.sum()) <= total:
        return np.full(w.size, upper)
    c = costs.astype(float)

    def spent(lam: float) -> float:
        return float(c @ np.clip(lam * w, lo, upper))

    # An upper bracket: lam * w alone spends the total, or every positive weight sits at hi.
    lam_hi = total / float(c @ w) if hi is None else upper / float(w[w > 0].min())
    if spent(lam_hi) <= total:
        return np.clip(lam_hi * w, lo, upper)
    lam_lo = 0.0  # spends sum(costs * lo) <= total, checked by _validate
    for _ in range(200):
        mid = 0.5 * (lam_lo + lam_hi)
        if not lam_lo < mid < lam_hi:
            break
        if spent(mid) <= total:
            lam_lo = mid
        else:
            lam_hi = mid
    return np.clip(lam_lo * w, lo, upper)


def _fill(target: np.ndarray, start: np.ndarray, scores: np.ndarray, costs: np.ndarray, total: int,
          k: int, hi: int | None) -> list[int]:
    """Greedy fill: repeatedly add k to the eligible layer with the largest shortfall target - rank.

    Ties go to the higher score, then the lower index. A best candidate that is not eligible never
    becomes eligible again (the budget only shrinks; a higher-score layer blocking it is itself stuck),
    so it retires with its rank final. Between retirements the greedy cycles through the active layers,
    one increment each per round, so whole rounds that retire no one are applied at once: a cheap
    layer soaking up a large leftover then costs O(L) per retirement, not one step per increment.
    """
    base = start.copy()  # an active layer's rank is base + level
    level = 0
    cap = np.full(scores.size, _NO_CAP if hi is None else hi, dtype=np.int64)  # r_max and monotonicity
    active = np.ones(scores.size, dtype=bool)
    active_cost = int(costs.sum())
    left = total - int(costs @ start)
    final = start.copy()
    heap = [(-float(target[i] - base[i]), -float(scores[i]), i) for i in range(scores.size)]
    heapq.heapify(heap)
    retired = True
    while heap:
        if retired and left >= k * active_cost:
            room = (cap[active] - base[active] - level) // k
            rounds = min(left // (k * active_cost), int(room.min()))
            level += rounds * k
            left -= rounds * k * active_cost
        retired = False
        _, _, i = heapq.heappop(heap)
        rank = int(base[i]) + level
        step_cost = int(costs[i]) * k
        if step_cost <= left and rank + k <= cap[i]:
            base[i] += k
            left -= step_cost
            heapq.heappush(heap, (-float(target[i] - base[i]), -float(scores[i]), i))
        else:
            # Higher-score active layers are never below an active lower-score one, so only retired
            # layers can block monotonicity: cap every strictly lower-score layer at this rank.
            final[i] = rank
            active[i] = False
            active_cost -= int(costs[i])
            lower = scores < scores[i]
            cap[lower] = np.minimum(cap[lower], rank)
            retired = True
    return [int(r) for r in final]

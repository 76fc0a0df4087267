"""Integer LoRA ranks per layer from importance scores: proportional, monotone, never over budget.

Every layer starts at its proportional rank rounded down (a multiple of ``multiple_of``); the
leftover is then handed out greedily, largest shortfall first, and, when that greedy order leaves
budget that another choice of increments could spend, an exact search over the increments on top
of the floors (``_best_fill``) spends as much of it as the integers allow.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from numbers import Real

import numpy as np

from .budget import as_whole

__all__ = ["allocate", "min_budget"]

_SIG_DIGITS = 12  # normalised scores are rounded to this many digits (see _weights)
_NO_CAP = np.iinfo(np.int64).max // 4  # "no upper bound" as an int64 that cannot overflow in our sums
# Cells (levels x budget steps) the exact fill may visit; past it the greedy fill stands (see _best_fill).
_EXACT_FILL_CELLS = 300_000_000


def min_budget(costs: Sequence[int], r_min: int, multiple_of: int = 1) -> int:
    """Smallest total that gives every layer ``r_min`` (rounded up to ``multiple_of``)."""
    return -(-r_min // multiple_of) * multiple_of * sum(int(c) for c in costs)


def allocate(scores: Sequence[float], total: int, *, costs: Sequence[int] | None = None, r_min: int = 0,
             r_max: int | None = None, multiple_of: int = 1, temperature: float = 1.0) -> list[int]:
    """Integer ranks, one per score, with sum(rank * cost) <= total.

    Ranks lie in [r_min, r_max] (rounded inwards to multiples of ``multiple_of``), are monotone in
    score (equal scores: no order between them), and are proportional to
    ``(score / max score) ** temperature`` up to those clamps and integer rounding: each layer gets
    at least its proportional rank rounded down. Of the allocations on top of those floors that
    respect the bounds and monotonicity, the one returned spends the most budget (greedy,
    largest shortfall first, where that order is as good as any; exact search otherwise; see
    ``_best_fill`` for the one size limit).
    """
    s, c, total, k, hi, target, start = _proportional_floor(scores, total, costs, r_min, r_max, multiple_of,
                                                            temperature)
    greedy = _fill(target, start, s, c, total, k, hi)
    best = _best_fill(np.asarray(greedy, dtype=np.int64), start, s, c, total, k, hi)
    return greedy if best is None else best


def _proportional_floor(scores, total, costs, r_min, r_max, multiple_of, temperature):
    """Validated inputs, the continuous target ranks and their floors (multiples of k, monotone)."""
    s, c, total, lo, hi, k = _validate(scores, total, costs, r_min, r_max, multiple_of, temperature)
    target = _continuous_target(_weights(s, temperature), c, total, lo, hi)
    # Guard against 1-ulp non-monotonicity from pow/clip: the fill relies on targets monotone in score.
    order = np.argsort(-s, kind="stable")
    target[order] = np.minimum.accumulate(target[order])
    start = (np.floor(target / k) * k).astype(np.int64)
    return s, c, total, k, hi, target, start


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
        whole = [as_whole(x) for x in costs]
        for i, x in enumerate(whole):
            if x is None or x <= 0:
                raise ValueError(f"costs[{i}]={costs[i]!r} must be a positive integer (e.g. d_in + d_out)")
        c = np.asarray(whole, dtype=np.int64)
    k = as_whole(multiple_of)
    if k is None or k < 1:
        raise ValueError(f"multiple_of={multiple_of!r} must be an integer >= 1; use 1 for any rank")
    if as_whole(r_min) is None or r_min < 0:
        raise ValueError(f"r_min={r_min!r} must be an integer >= 0; use 0 to allow dropping layers")
    if r_max is not None and as_whole(r_max) is None:
        raise ValueError(f"r_max={r_max!r} must be an integer or None (no upper bound)")
    if not isinstance(temperature, Real) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be finite and >= 0; use 1 for proportional, 0 for uniform")
    lo = -(-int(r_min) // k) * k
    hi = None if r_max is None else int(r_max) // k * k
    if hi is not None and lo > hi:
        raise ValueError(f"r_min={r_min} rounds up to {lo} but r_max={r_max} rounds down to {hi} "
                         f"(multiple_of={k}); lower r_min or raise r_max")
    whole_total = as_whole(total)
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


def _best_fill(greedy: np.ndarray, start: np.ndarray, scores: np.ndarray, costs: np.ndarray, total: int,
               k: int, hi: int | None) -> list[int] | None:
    """The allocation on top of ``start`` that spends the most, or None when ``greedy`` already does.

    Greedy increments can strand budget that another choice would spend (ties [1,1,1], costs
    [9,3,7], 108 to spend in steps of 2 up to 6: greedy [6,6,4] spends 100, [6,4,6] all 108), so
    this is a 0/1 reachability table over the budget left above the floors, in units of the gcd of
    the step costs: layers are taken in descending score, and the state is (spend, the lowest level
    reached so far), the ceiling a lower-score layer may not pass. Layers of equal score form one
    group with no order inside it. Among the allocations that spend the most, the walk back picks
    levels closest to the greedy's, so ranks move only as far as the extra spend needs.

    The table has (levels x budget units) cells per group; past ``_EXACT_FILL_CELLS`` in all (a
    leftover of millions of parameters in steps without a common factor: real layer widths share
    large factors and rank budgets have unit steps) the greedy result stands, within one step cost.
    """
    steps = costs * k
    left = total - int(costs @ start)
    unit = math.gcd(*(int(x) for x in steps))
    greedy_extra = int(costs @ (greedy - start))
    if left - greedy_extra < unit:
        return None  # nothing left that any increment could use
    budget = left // unit
    w = steps // unit
    level0 = start // k
    most = level0 + budget // w
    top = most if hi is None else np.minimum(most, hi // k)
    base = int(level0.min())
    lo_i, hi_i = level0 - base, top - base  # each layer's level range, indices into the table
    levels = int(hi_i.max()) + 1
    order = np.argsort(-scores, kind="stable")
    groups = [list(g) for g in _runs(order, scores)]
    cells = sum(len(g) * levels ** (1 if len(g) == 1 else 2) for g in groups) * (budget + 1) + \
        len(groups) * levels * (budget + 1)
    if cells > _EXACT_FILL_CELLS:
        return None
    table = np.zeros((levels, budget + 1), dtype=bool)
    table[levels - 1, 0] = True  # before any layer: no ceiling, nothing spent
    history = [np.packbits(table, axis=1)]  # kept for the walk back; bits, not bytes, per cell
    for group in groups:
        table = _step_group(table, group, lo_i, hi_i, w, budget)
        history.append(np.packbits(table, axis=1))
    spendable = np.flatnonzero(table.any(axis=0))
    best = int(spendable.max())
    if best * unit <= greedy_extra:
        return None
    want = greedy // k - base  # greedy levels, the preference when walking back
    level_of = np.empty(len(start), dtype=np.int64)
    ceiling = _closest(np.flatnonzero(table[:, best]), int(want[groups[-1]].min()))
    spend = best
    for index in range(len(groups) - 1, -1, -1):
        group, before = groups[index], np.unpackbits(history[index], axis=1, count=budget + 1).astype(bool)
        prefer = int(want[groups[index - 1]].min()) if index else levels - 1
        ceiling, spend = _walk_back(before, group, ceiling, spend, lo_i, hi_i, w, want, prefer, level_of)
    return [int(x) for x in (level_of + base) * k]


def _runs(order: np.ndarray, scores: np.ndarray):
    """Indices in ``order`` grouped into runs of equal score."""
    group = [int(order[0])]
    for i in order[1:]:
        if scores[i] == scores[group[0]]:
            group.append(int(i))
        else:
            yield group
            group = [int(i)]
    yield group


def _shift_or(into: np.ndarray, row: np.ndarray, by: int) -> None:
    if by < into.shape[-1]:
        into[by:] |= row[: into.shape[-1] - by]


def _member(row: np.ndarray, i: int, low: int, high: int, lo_i, w) -> np.ndarray:
    """Spends reachable from ``row`` when layer i takes a level in [low, high]."""
    out = np.zeros_like(row)
    for level in range(low, high + 1):
        _shift_or(out, row, int(w[i]) * (level - int(lo_i[i])))
    return out


def _step_group(table: np.ndarray, group: list[int], lo_i, hi_i, w, budget: int) -> np.ndarray:
    """The table after one group of equal-score layers: rows are the new ceiling (the group's lowest
    level, or less), columns the spend."""
    new = np.zeros_like(table)
    if len(group) == 1:
        (i,) = group
        reachable = np.logical_or.accumulate(table[::-1], axis=0)[::-1]  # any ceiling >= the row
        for level in range(int(lo_i[i]), int(hi_i[i]) + 1):
            _shift_or(new[level], reachable[level], int(w[i]) * (level - int(lo_i[i])))
        return new
    for ceiling in np.flatnonzero(table.any(axis=1)):
        for floor in range(int(ceiling) + 1):
            row = table[ceiling]
            for i in group:
                low, high = max(int(lo_i[i]), floor), min(int(hi_i[i]), int(ceiling))
                if low > high:
                    break
                row = _member(row, i, low, high, lo_i, w)
            else:
                new[floor] |= row
    return new


def _closest(candidates: np.ndarray, want: int) -> int:
    return int(min(candidates, key=lambda c: (abs(int(c) - want), -int(c))))


def _walk_back(before, group, ceiling, spend, lo_i, hi_i, w, want, prefer, level_of):
    """Undo one group of _step_group: set its layers' levels in ``level_of`` and return the ceiling
    and spend before it, preferring levels (and a previous ceiling) closest to the greedy's."""
    rows = np.flatnonzero(before.any(axis=1))
    for previous in sorted((int(r) for r in rows if r >= ceiling), key=lambda r: (abs(r - prefer), -r)):
        if len(group) == 1:
            (i,) = group
            cost = int(w[i]) * (ceiling - int(lo_i[i]))
            if cost <= spend and before[previous, spend - cost]:
                level_of[i] = ceiling
                return previous, spend - cost
            continue
        partial = [before[previous]]
        ranges = []
        for i in group:
            low, high = max(int(lo_i[i]), ceiling), min(int(hi_i[i]), previous)
            if low > high:
                break
            ranges.append((low, high))
            partial.append(_member(partial[-1], i, low, high, lo_i, w))
        if len(ranges) < len(group) or not partial[-1][spend]:
            continue
        left = spend
        for j in range(len(group) - 1, -1, -1):
            i, (low, high) = group[j], ranges[j]
            for level in sorted(range(low, high + 1), key=lambda v: (abs(v - int(want[i])), -v)):
                cost = int(w[i]) * (level - int(lo_i[i]))
                if cost <= left and partial[j][left - cost]:
                    level_of[i], left = level, left - cost
                    break
        return previous, left
    raise AssertionError("exact fill: no way back through the table")  # the table says there is one

"""The allocation settings (DESIGN §6), one frozen value checked when it is made, and the alpha
policy: what a layer's LoRA alpha is under each policy, and how it meets PEFT's ``use_rslora``.

Torch-free: the plan file format reads and writes these settings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

from .allocate import allocate
from .budget import Budget, as_whole
from .choices import ALPHA_POLICIES, IF_UNCERTAIN, SCORES

__all__ = ["ALPHA_POLICIES", "AllocationConfig", "layer_alpha"]


def layer_alpha(policy: str, base_alpha: float, base_rank: int, rank: int) -> float:
    """The alpha of a layer of rank ``rank`` under an alpha policy.

    fixed_scale keeps PEFT's scale alpha/r at base_alpha/base_rank in every layer; fixed_alpha
    keeps alpha itself (PEFT's default: the scale then varies as 1/r); rslora keeps alpha with
    scale alpha/sqrt(r).
    """
    if policy == "fixed_scale":
        return base_alpha * rank / base_rank
    if policy in ("fixed_alpha", "rslora"):
        return float(base_alpha)
    raise ValueError(f"alpha_policy={policy!r} is not known; use one of {', '.join(ALPHA_POLICIES)}")


def _whole(value: Any, name: str, minimum: int, fix: str) -> None:
    whole = as_whole(value)
    if whole is None or whole < minimum:
        raise ValueError(f"AllocationConfig.{name}={value!r} must be an integer >= {minimum}; {fix}")


@dataclass(frozen=True)
class AllocationConfig:
    """How a budget is split across layers. ``None`` fields take their default from the base rank r
    (``resolved``): budget = the parameter count of uniform rank r, r_min = r // 2, r_max = 2 r,
    alpha_policy = "rslora" if the base LoraConfig asks for rsLoRA, else "fixed_scale".

    Every field is checked here, so that a bad setting fails before any calibration work.
    """

    budget: Budget | None = None
    r_min: int | None = None
    r_max: int | None = None
    multiple_of: int = 1
    temperature: float = 1.0
    alpha_policy: str | None = None
    score: str = "variance"
    # When the calibration cannot tell the layers apart (fimlora.confidence: flat or unstable map):
    # "uniform" spends the budget evenly, "allocate" keeps the score-based ranks, "error" raises.
    if_uncertain: str = "uniform"

    def __post_init__(self) -> None:
        if self.budget is not None and not isinstance(self.budget, Budget):
            raise ValueError(f"AllocationConfig.budget={self.budget!r} must be a fimlora.Budget or None; "
                             "e.g. Budget.mean_rank(8) or Budget.parse('params:120000')")
        if self.r_min is not None:
            _whole(self.r_min, "r_min", 0, "use 0 to allow dropping layers")
        if self.r_max is not None:
            _whole(self.r_max, "r_max", 1, "or None for 2 x the base rank")
        if self.r_min is not None and self.r_max is not None and self.r_min > self.r_max:
            raise ValueError(f"AllocationConfig.r_min={self.r_min} is above r_max={self.r_max}; "
                             "lower r_min or raise r_max")
        _whole(self.multiple_of, "multiple_of", 1, "use 1 for any rank")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, Real) or not math.isfinite(t) or t < 0:
            raise ValueError(f"AllocationConfig.temperature={t!r} must be finite and >= 0; "
                             "use 1 for proportional, 0 for uniform")
        if self.alpha_policy is not None and self.alpha_policy not in ALPHA_POLICIES:
            raise ValueError(f"AllocationConfig.alpha_policy={self.alpha_policy!r} is not known; "
                             f"use one of {', '.join(ALPHA_POLICIES)}")
        if self.score not in SCORES:
            raise ValueError(f"AllocationConfig.score={self.score!r} is not known; use one of {', '.join(SCORES)}")
        if self.if_uncertain not in IF_UNCERTAIN:
            raise ValueError(f"AllocationConfig.if_uncertain={self.if_uncertain!r} is not known; "
                             f"use one of {', '.join(IF_UNCERTAIN)}")

    def resolved(self, base_rank: int, *, use_rslora: bool = False) -> AllocationConfig:
        """Every default filled in from the base rank r and PEFT's ``use_rslora``. An explicit
        alpha policy that contradicts ``use_rslora=True`` is refused, never silently replaced."""
        if isinstance(base_rank, bool) or not isinstance(base_rank, int) or base_rank < 1:
            raise ValueError(f"the base rank (LoraConfig.r, --rank) must be a positive integer, got {base_rank!r}")
        policy = self.alpha_policy
        if use_rslora and policy not in (None, "rslora"):
            raise ValueError(f"LoraConfig(use_rslora=True) contradicts alpha_policy={policy!r}; pass "
                             "alpha_policy='rslora' (or leave it None), or use_rslora=False")
        return dataclasses.replace(
            self,
            budget=self.budget or Budget.mean_rank(base_rank),
            r_min=base_rank // 2 if self.r_min is None else self.r_min,
            r_max=2 * base_rank if self.r_max is None else self.r_max,
            alpha_policy=policy or ("rslora" if use_rslora else "fixed_scale"),
        )

    def _require_resolved(self) -> None:
        if self.budget is None or self.r_min is None or self.r_max is None or self.alpha_policy is None:
            raise ValueError("this AllocationConfig still has defaults to fill in; call .resolved(base_rank) first")

    def allocate(self, scores: Sequence[float], shapes: Sequence[tuple[int, int]]) -> tuple[list[int], int]:
        """(ranks, budget total) for layers of these (d_in, d_out) shapes and scores."""
        self._require_resolved()
        total, costs = self.budget.resolve(shapes)
        ranks = allocate(scores, total, costs=costs, r_min=self.r_min, r_max=self.r_max,
                         multiple_of=self.multiple_of, temperature=self.temperature)
        return ranks, total

    def allocate_uniformly(self, shapes: Sequence[tuple[int, int]]) -> tuple[list[int], int]:
        """(ranks, budget total) spending the same budget evenly: every layer weighs the same."""
        return dataclasses.replace(self, temperature=0.0).allocate([1.0] * len(shapes), shapes)

    def check(self, shapes: Sequence[tuple[int, int]]) -> None:
        """Raise now, before any calibration work, if these settings cannot succeed on these layers."""
        self.allocate([1.0] * len(shapes), shapes)

    def unreachable(self, shapes: Sequence[tuple[int, int]]) -> str | None:
        """Why the budget cannot shape the ranks on these layers, whatever the scores, or None.

        A budget at or above what r_max in every layer costs gives every layer r_max (a uniform
        adapter, part of the budget unspent); one that pays for no more than r_min everywhere gives
        every layer r_min. Raises ValueError when it pays for no rank at all."""
        self._require_resolved()
        total, costs = self.budget.resolve(shapes)
        k = self.multiple_of
        lo, hi = -(-self.r_min // k) * k, self.r_max // k * k  # the clamps rounded inwards, as allocate does
        ceiling, floor = hi * sum(costs), lo * sum(costs)
        step = k * min(costs)
        if hi == 0 or (lo == 0 and total < step):
            raise ValueError(f"the budget ({total:,} {self.budget.unit}) pays for no rank in any layer (one rank "
                             f"step costs at least {step:,}); raise the budget or lower multiple_of")
        if total >= ceiling:
            spent = 100.0 * ceiling / total
            return (f"r_max={self.r_max} caps every layer, so the adapter is uniform rank {hi} and spends {spent:.0f}% "
                    f"of the budget ({ceiling:,} of {total:,} {self.budget.unit}); raise r_max (--r-max) above the "
                    "budget's mean rank, or lower the budget (or raise the base rank, --rank, which moves both)")
        if total - floor < step:
            return (f"the budget ({total:,} {self.budget.unit}) pays for no more than r_min={self.r_min} in every "
                    "layer, so the adapter is uniform; lower r_min (--r-min) or raise the budget")
        return None

    def to_dict(self) -> dict[str, Any]:
        """The plan file's "allocation" section (the budget and alpha policy are written beside it)."""
        return {"r_min": self.r_min, "r_max": self.r_max, "multiple_of": self.multiple_of,
                "temperature": self.temperature, "score": self.score, "if_uncertain": self.if_uncertain}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, budget: Budget | None, alpha_policy: str | None) -> AllocationConfig:
        """Inverse of ``to_dict``, given the budget and alpha policy stored beside it."""
        return cls(budget=budget, alpha_policy=alpha_policy, **d)

"""How much LoRA to spend: the budget kinds, their unit, and their (de)serialisation.

Torch- and numpy-free, so that the allocator and the plan file format can both use it
without depending on each other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real
from typing import Any

__all__ = ["BUDGET_KINDS", "Budget", "as_whole"]

BUDGET_KINDS = ("mean_rank", "rank", "params")
_PARSE_HELP = ("use 'R' or 'mean:R' (the uniform rank R with the same parameter count, e.g. 8), "
               "'rank:N' (sum of ranks) or 'params:N' (trainable parameters)")


def as_whole(x: Any) -> int | None:
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
        whole = as_whole(v)
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

    @property
    def unit(self) -> str:
        """What the budget counts: "ranks" for a rank budget, "params" otherwise."""
        return "ranks" if self.kind == "rank" else "params"

    def cost(self, d_in: int, d_out: int) -> int:
        """What one rank of a (d_in, d_out) layer costs, in the budget's unit."""
        return 1 if self.kind == "rank" else d_in + d_out

    def resolve(self, shapes: Sequence[tuple[int, int]]) -> tuple[int, list[int]]:
        """Return ``(total, costs)`` for layers of the given ``(d_in, d_out)`` shapes.

        mean_rank r: costs d_in + d_out, total floor(r * sum(costs)); rank: costs all 1, total value;
        params: costs d_in + d_out, total value.
        """
        dims = []
        for i, shape in enumerate(shapes):
            pair = [as_whole(d) for d in shape]
            if len(pair) != 2 or any(d is None or d <= 0 for d in pair):
                raise ValueError(f"shapes[{i}]={tuple(shape)!r} must be two positive integers (d_in, d_out)")
            dims.append(pair)
        if not dims:
            raise ValueError("shapes is empty; pass one (d_in, d_out) per LoRA layer")
        costs = [self.cost(d_in, d_out) for d_in, d_out in dims]
        if self.kind != "mean_rank":
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

"""Rank plans: the per-layer LoRA ranks chosen by calibration, and their JSON file format.

A plan is the hand-off from (expensive) calibration to (cheap) adapter building, and
people read and edit it by hand, so loading validates every field and says how to fix
it.  No torch/transformers/peft here: plans can be inspected on any machine.

Format history (``_MIGRATIONS`` upgrades older files on load):
  1  the allocation settings (r_min, r_max, multiple_of, temperature, score) sat in
     "calibration"; the compiled backend was recorded as "cuda".
  2  they have their own "allocation" section; the compiled backend is "compiled".
  3  "confidence": the bootstrap intervals and stability of the map (null when not measured),
     and "allocation.if_uncertain" (format-2 plans were allocated whatever the uncertainty).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from ._io import atomic_write_text
from .allocation import AllocationConfig
from .budget import BUDGET_KINDS, Budget
from .choices import ALPHA_POLICIES, IF_UNCERTAIN, SCORES
from .confidence import MapConfidence
from .plan_render import plan_heatmap, plan_table, split_block_and_type

__all__ = ["PLAN_FORMAT_VERSION", "LayerPlan", "PlanError", "RankPlan", "split_block_and_type"]

PLAN_FORMAT_VERSION = 3

# Key order here is the order written to disk: summary first, the long layer list last.
_PLAN_KEYS = ("format_version", "alpha_policy", "base_rank", "base_alpha", "budget", "allocation",
              "calibration", "versions", "confidence", "layers")
_LAYER_KEYS = ("name", "d_in", "d_out", "rank", "alpha", "score", "stats")
_BUDGET_KEYS = ("kind", "value", "total")  # files also carry "used", derived from the layers when written
_ALLOCATION_KEYS = ("r_min", "r_max", "multiple_of", "temperature", "score", "if_uncertain")


class PlanError(ValueError):
    """A rank plan or plan file is malformed; the message names the field and the fix."""


@dataclass
class LayerPlan:
    """The rank chosen for one linear module."""

    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj"
    d_in: int
    d_out: int
    rank: int  # 0 leaves the module out of the adapter
    alpha: float  # LoRA alpha under the plan's alpha policy
    score: float  # importance score (>= 0, finite)
    stats: dict[str, float] = field(default_factory=dict)  # e.g. count, variance, fisher, mean_sq

    @property
    def params(self) -> int:
        """Trainable LoRA parameters: A is rank x d_in, B is d_out x rank."""
        return self.rank * (self.d_in + self.d_out)


@dataclass
class RankPlan:
    """Per-layer ranks plus everything needed to reproduce and audit them."""

    layers: list[LayerPlan]
    allocation: AllocationConfig  # resolved: budget, r_min, r_max and alpha_policy all set
    budget_total: int  # the budget resolved over these layers, in the budget's unit
    base_rank: int  # the uniform rank r the budget was derived from
    base_alpha: float
    calibration: dict[str, Any] = field(default_factory=dict)  # how the scores were measured (free-form record)
    versions: dict[str, Any] = field(default_factory=dict)  # library versions (fimlora, torch, transformers, ...)
    # How sure the map is (bootstrap over calibration samples) and what was done about it: None
    # when not measured. ``decision``: "allocated" or "uniform", and the one-line reason.
    confidence: MapConfidence | None = None
    decision: dict[str, str] | None = None
    format_version: int = PLAN_FORMAT_VERSION

    @property
    def budget(self) -> Budget:
        return self.allocation.budget

    @property
    def alpha_policy(self) -> str:
        return self.allocation.alpha_policy

    @property
    def ranks(self) -> dict[str, int]:
        """Module name -> rank, in layer order."""
        return {lp.name: lp.rank for lp in self.layers}

    @property
    def alphas(self) -> dict[str, float]:
        """Module name -> alpha, in layer order."""
        return {lp.name: lp.alpha for lp in self.layers}

    @property
    def total_params(self) -> int:
        """Trainable LoRA parameters summed over all layers."""
        return sum(lp.params for lp in self.layers)

    @property
    def budget_used(self) -> int:
        """What the layers spend of the budget, in its unit: the sum of ranks for a "rank"
        budget, trainable parameters otherwise. Derived, so a plan edited by hand stays true."""
        return sum(lp.rank * self.budget.cost(lp.d_in, lp.d_out) for lp in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """A deep-copied, JSON-shaped dict (not validated; see :meth:`validate`)."""
        # Free-form dicts are key-sorted so that plan files diff cleanly between runs.
        top = {
            "format_version": self.format_version, "alpha_policy": self.alpha_policy,
            "base_rank": self.base_rank, "base_alpha": self.base_alpha,
            "budget": {**self.budget.to_dict(), "total": self.budget_total, "used": self.budget_used},
            "allocation": self.allocation.to_dict(),
            "calibration": _sorted(self.calibration), "versions": _sorted(self.versions),
            "confidence": None if self.confidence is None else {**self.confidence.to_dict(), **(self.decision or {})},
        }
        layers = [{**dataclasses.asdict(lp), "stats": _sorted(lp.stats)} for lp in self.layers]
        return copy.deepcopy({**top, "layers": layers})

    @classmethod
    def from_dict(cls, d: Any, *, source: str | Path | None = None) -> RankPlan:
        """Build a plan from :meth:`to_dict` output, validating every field (:class:`PlanError`).

        ``source`` (a file name) only makes error messages point at the file."""
        return _Parser(str(source) if source is not None else None).plan(d)

    def validate(self) -> RankPlan:
        """Return a normalised copy (plain ints/floats), raising :class:`PlanError` if invalid."""
        return RankPlan.from_dict(self.to_dict())

    def to_json(self) -> str:
        """Validated JSON, indent=2: fixed key order, layer order preserved."""
        clean = self.validate()  # fail at save time rather than when someone loads the file
        try:
            return json.dumps(clean.to_dict(), indent=2, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise PlanError(f"invalid plan: not JSON-serialisable ({exc}); calibration and versions may only "
                            "hold strings, finite numbers, booleans, None, lists and dicts") from exc

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON atomically (a crash never leaves a truncated file)."""
        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RankPlan:
        """Read and validate a plan file; every problem raises :class:`PlanError` naming the file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanError(f"cannot read plan file {path}: {exc}; check the path") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                            f"{exc.msg}); it may be truncated or mis-edited, fix it or regenerate the plan") from exc
        return cls.from_dict(data, source=path)

    def table(self, max_rows: int | None = None) -> str:
        """An aligned text table, one row per layer, plus a one-line summary footer.

        Past ``max_rows`` layers, the first and last rows frame a ``... N more ...`` line."""
        return plan_table(self, max_rows)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Atomically save a PNG heatmap of ranks (rows: block, columns: module type); return the path.

        ``title`` replaces the default title (model name and budget summary)."""
        return plan_heatmap(self, path, title)


def _sorted(value: Any) -> Any:
    """Recursively key-sort dicts so free-form sections serialise deterministically."""
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value, key=str)}
    return [_sorted(v) for v in value] if isinstance(value, list) else value


class _Parser:
    """Validates plan dicts; every error names the file (if any), the field path and a fix."""

    def __init__(self, source: str | None) -> None:
        self.origin = f"invalid plan file {source}" if source else "invalid plan"

    def fail(self, where: str, problem: str, fix: str = "fix the value or regenerate the plan") -> NoReturn:
        raise PlanError(f"{self.origin}: {where} {problem}; {fix}")

    def integer(self, v: Any, where: str, minimum: int) -> int:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
            self.fail(where, f"must be an integer >= {minimum}, got {v!r} ({type(v).__name__})")
        return int(v)

    def number(self, v: Any, where: str, minimum: float | None = 0.0) -> int | float:
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or (minimum is not None and v < minimum):
            bound = f" >= {minimum:g}" if minimum is not None else ""
            self.fail(where, f"must be a finite number{bound}, got {v!r} ({type(v).__name__})")
        return int(v) if isinstance(v, numbers.Integral) else float(v)

    def choice(self, v: Any, where: str, options: tuple[str, ...]) -> str:
        if v not in options:
            self.fail(where, f"must be one of {', '.join(options)}, got {v!r}")
        return v

    def obj(self, v: Any, where: str, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Check ``v`` is a dict with string keys (exactly ``keys``, if given)."""
        if not isinstance(v, dict):
            self.fail(where, f"must be a JSON object, got {type(v).__name__}")
        if any(not isinstance(k, str) for k in v):
            self.fail(where, "has a non-string key", "keys must be strings")
        if keys is not None:
            missing = [k for k in keys if k not in v]
            if missing:
                self.fail(f"{where}.{missing[0]}".removeprefix("plan."), "is missing",
                          f"add it or regenerate the plan (expected keys: {', '.join(keys)})")
            extra = sorted(k for k in v if k not in keys)
            if extra:
                self.fail(where, f"has unexpected key(s) {', '.join(map(repr, extra))}",
                          "remove them; the file may come from another tool or fimlora version")
        return v

    def plan(self, d: Any) -> RankPlan:
        self.obj(d, "plan")
        # The version goes first: a newer format may legitimately have other keys.
        if "format_version" not in d:
            self.fail("format_version", "is missing", "this does not look like a fimlora plan file")
        version = self.integer(d["format_version"], "format_version", 1)
        if version > PLAN_FORMAT_VERSION:
            self.fail("format_version", f"is {version}: written by a newer fimlora (this one reads up to "
                      f"{PLAN_FORMAT_VERSION})", "upgrade fimlora (pip install -U fimlora)")
        for older in range(version, PLAN_FORMAT_VERSION):
            d = _MIGRATIONS[older](d)
        self.obj(d, "plan", _PLAN_KEYS)
        budget = self.obj(d["budget"], "budget")
        budget = self.obj({k: v for k, v in budget.items() if k != "used"}, "budget", _BUDGET_KEYS)
        total = self.integer(budget["total"], "budget.total", 0)
        base_rank = self.integer(d["base_rank"], "base_rank", 1)
        allocation = self.allocation(d["allocation"], budget, d["alpha_policy"])
        if not isinstance(d["layers"], list):
            self.fail("layers", f"must be a JSON list, got {type(d['layers']).__name__}")
        if not d["layers"]:
            self.fail("layers", "is empty", "a plan must cover at least one module; check target modules")
        layers = [self.layer(item, f"layers[{i}]") for i, item in enumerate(d["layers"])]
        first: dict[str, int] = {}
        for i, lp in enumerate(layers):
            if lp.name in first:
                self.fail(f"layers[{i}].name", f"{lp.name!r} duplicates layers[{first[lp.name]}].name",
                          "each module may appear only once; remove one")
            first[lp.name] = i
        plan = RankPlan(
            layers=layers,
            allocation=allocation,
            budget_total=total,
            base_rank=base_rank,
            base_alpha=float(self.number(d["base_alpha"], "base_alpha")),
            calibration=copy.deepcopy(self.obj(d["calibration"], "calibration")),
            versions=copy.deepcopy(self.obj(d["versions"], "versions")),
            **self.confidence(d["confidence"], layers),
        )
        if plan.budget_used > total:
            self.fail("layers", f"spend {plan.budget_used} of the budget, over budget.total ({total})",
                      "lower some ranks or regenerate the plan")
        return plan

    def confidence(self, section: Any, layers: list[LayerPlan]) -> dict[str, Any]:
        if section is None:
            return {"confidence": None, "decision": None}
        section = copy.deepcopy(self.obj(section, "confidence"))
        decision = {k: section.pop(k) for k in ("action", "reason") if k in section}
        if decision.get("action", "allocated") not in ("allocated", "uniform"):
            self.fail("confidence.action", f"is {decision['action']!r}", "use 'allocated' or 'uniform'")
        try:
            confidence = MapConfidence.from_dict(section)
        except (TypeError, KeyError, ValueError) as exc:
            self.fail("confidence", f"is malformed ({exc})")
        missing = [lp.name for lp in layers if lp.name not in confidence.layers]
        if missing:
            self.fail("confidence.layers", f"has no interval for {missing[0]!r}", "regenerate the plan")
        return {"confidence": confidence, "decision": decision or None}

    def allocation(self, section: Any, budget: dict[str, Any], alpha_policy: Any) -> AllocationConfig:
        self.obj(section, "allocation", _ALLOCATION_KEYS)
        kind = self.choice(budget["kind"], "budget.kind", BUDGET_KINDS)
        value = self.number(budget["value"], "budget.value")
        try:
            typed_budget = Budget(kind, value)
        except ValueError as exc:
            self.fail("budget.value", f"is invalid ({exc})")
        fields = {
            "r_min": self.integer(section["r_min"], "allocation.r_min", 0),
            "r_max": self.integer(section["r_max"], "allocation.r_max", 1),
            "multiple_of": self.integer(section["multiple_of"], "allocation.multiple_of", 1),
            "temperature": self.number(section["temperature"], "allocation.temperature"),
            "score": self.choice(section["score"], "allocation.score", SCORES),
            "if_uncertain": self.choice(section["if_uncertain"], "allocation.if_uncertain", IF_UNCERTAIN),
        }
        policy = self.choice(alpha_policy, "alpha_policy", ALPHA_POLICIES)
        try:
            return AllocationConfig.from_dict(fields, budget=typed_budget, alpha_policy=policy)
        except ValueError as exc:
            self.fail("allocation", f"is inconsistent ({exc})")

    def layer(self, item: Any, where: str) -> LayerPlan:
        self.obj(item, where, _LAYER_KEYS)
        if not isinstance(item["name"], str) or not item["name"]:
            self.fail(f"{where}.name", f"must be a non-empty module name, got {item['name']!r}")
        stats = self.obj(item["stats"], f"{where}.stats")
        return LayerPlan(
            name=item["name"],
            d_in=self.integer(item["d_in"], f"{where}.d_in", 1),
            d_out=self.integer(item["d_out"], f"{where}.d_out", 1),
            rank=self.integer(item["rank"], f"{where}.rank", 0),
            alpha=float(self.number(item["alpha"], f"{where}.alpha")),
            score=float(self.number(item["score"], f"{where}.score")),
            stats={k: self.number(v, f"{where}.stats.{k}", None) for k, v in stats.items()},
        )


def _from_v1(d: Any) -> Any:
    """Format 1 -> 2: the allocation settings move out of "calibration" into "allocation", and the
    compiled backend's old name "cuda" becomes "compiled" (it runs on CPU and CUDA alike)."""
    if not isinstance(d, dict) or not isinstance(d.get("calibration"), dict):
        return d  # the parser names what is wrong
    d = copy.deepcopy(d)
    calibration = d["calibration"]
    moved = {k: calibration.pop(k) for k in _ALLOCATION_KEYS if k in calibration}
    if calibration.get("backend") == "cuda":
        calibration["backend"] = "compiled"
    base_rank = d.get("base_rank")
    if isinstance(base_rank, int) and not isinstance(base_rank, bool) and base_rank >= 1:
        # A version-1 file without these keys was made by hand or by other code: the library defaults.
        defaults = AllocationConfig().resolved(base_rank).to_dict()
        defaults.pop("if_uncertain")  # a format-3 setting: _from_v2 records how these plans were made
        moved = {**defaults, **moved}
    d["allocation"] = moved
    d["format_version"] = 2
    return d


def _from_v2(d: Any) -> Any:
    """Format 2 -> 3: no confidence was measured, and the ranks were allocated whatever it was."""
    if not isinstance(d, dict):
        return d
    d = copy.deepcopy(d)
    d.setdefault("confidence", None)
    if isinstance(d.get("allocation"), dict):
        d["allocation"].setdefault("if_uncertain", "allocate")
    d["format_version"] = 3
    return d


# format version -> the function that upgrades a dict of that version to the next one
_MIGRATIONS = {1: _from_v1, 2: _from_v2}

"""fimlora: calibration-time gradient-variance rank allocation for PEFT LoRA adapters."""

from .adapter import PlanMismatchError, apply_plan, export_for_serving, lora_config_from_plan
from .allocate import Budget, allocate
from .backends import available_backends, use_backend
from .calibrate import CalibrationResult, NonFiniteError, calibrate
from .fisher import full_fisher
from .pipeline import get_peft_model, make_plan
from .plan import LayerPlan, PlanError, RankPlan
from .probe import draw_calibration_a
from .stats import LayerStats

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "CalibrationResult",
    "LayerPlan",
    "LayerStats",
    "NonFiniteError",
    "PlanError",
    "PlanMismatchError",
    "RankPlan",
    "allocate",
    "apply_plan",
    "available_backends",
    "calibrate",
    "draw_calibration_a",
    "export_for_serving",
    "full_fisher",
    "get_peft_model",
    "lora_config_from_plan",
    "make_plan",
    "use_backend",
]

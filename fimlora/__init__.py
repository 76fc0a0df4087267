"""fimlora: calibration-time gradient-variance rank allocation for PEFT LoRA adapters.

The public names below are loaded on first use, so that ``import fimlora.plan`` (reading a plan
on a machine without torch) and ``fimlora show`` stay light: nothing here imports torch until a
name that needs it is touched.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "AllocationConfig": "allocation",
    "Budget": "budget",
    "CalibrationResult": "calibrate",
    "CalibrationSettings": "calibrate",
    "LayerPlan": "plan",
    "LayerStats": "stats",
    "MapConfidence": "confidence",
    "NonFiniteError": "calibrate",
    "PlanError": "plan",
    "PlanCallback": "integrations",
    "PlanMismatchError": "adapter",
    "RankPlan": "plan",
    "UncertainMapError": "pipeline",
    "allocate": "allocate",
    "apply_plan": "adapter",
    "available_backends": "backends",
    "base_model_kwargs": "adapter",
    "calibrate": "calibrate",
    "check_adapter": "adapter",
    "draw_calibration_a": "probe",
    "export_for_serving": "adapter",
    "full_fisher": "fisher",
    "get_peft_model": "pipeline",
    "load_adapter": "adapter",
    "lora_config": "integrations",
    "lora_config_from_plan": "adapter",
    "make_plan": "pipeline",
    "plan_model": "pipeline",
    "save_pretrained": "integrations",
    "use_backend": "backends",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fimlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """``fimlora.calibrate`` and ``fimlora.allocate`` are functions named like their modules.
    Importing such a module makes the import system set the package attribute to the module;
    here that is refused, so the name keeps meaning the function (the module stays importable
    as ``fimlora.calibrate`` in sys.modules: ``from fimlora.calibrate import ...`` works)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

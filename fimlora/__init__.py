"""fimlora: calibration-time gradient-variance rank allocation for PEFT LoRA adapters."""

from .backends import available_backends, use_backend
from .calibrate import CalibrationResult, NonFiniteError, calibrate
from .probe import draw_calibration_a
from .stats import LayerStats

__version__ = "0.1.0"

__all__ = [
    "CalibrationResult",
    "LayerStats",
    "NonFiniteError",
    "available_backends",
    "calibrate",
    "draw_calibration_a",
    "use_backend",
]

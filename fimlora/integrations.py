"""fimlora with transformers' ``Trainer`` and TRL's ``SFTTrainer``.

The adapter's shapes are fixed when the trainer builds its optimizer, so calibration runs first,
outside the trainer, on the frozen model:

    # transformers Trainer: calibrate and wrap, then train the PEFT model as usual
    peft_model = fimlora.get_peft_model(model, batches, LoraConfig(r=8, target_modules="all-linear"))
    Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[fimlora.PlanCallback()])

    # TRL: the LoraConfig to pass as peft_config (SFTTrainer wraps the model itself)
    config = fimlora.lora_config(model, batches, LoraConfig(r=8, target_modules="all-linear"))
    SFTTrainer(model=model, args=args, train_dataset=ds, peft_config=config,
               callbacks=[fimlora.PlanCallback(config.fimlora_plan)])

The plan travels with the adapter as ``fimlora_plan.json`` beside ``adapter_config.json``: PEFT
ignores the file, :meth:`fimlora.RankPlan.load` reads it. :class:`PlanCallback` writes it into every
checkpoint and into the trainer's output directory at the end of training;
:func:`save_pretrained` writes the adapter and the plan together.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapter import PLAN_FILE, PlanMismatchError, lora_config_from_plan
from .allocation import AllocationConfig
from .pipeline import plan_model
from .plan import RankPlan
from .targets import is_lora_layer

__all__ = ["PLAN_FILE", "PlanCallback", "lora_config", "save_pretrained"]


def lora_config(model: nn.Module, data: Iterable[Mapping], base_config=None, *,
                allocation: AllocationConfig | None = None, batch_size: int = 8, **calibrate_kwargs):
    """Calibrate ``model`` on ``data`` and return the ``peft.LoraConfig`` of the allocated ranks.

    For trainers that wrap the model themselves (TRL's ``SFTTrainer(peft_config=...)``): the
    arguments are those of :func:`fimlora.get_peft_model`, and so is the calibration; the model is
    left unwrapped and unchanged. The plan rides along as ``config.fimlora_plan`` (not a PEFT
    field: PEFT neither saves nor reads it); pass it to :class:`PlanCallback` or
    :func:`save_pretrained` to keep it with the trained adapter.
    """
    plan = plan_model(model, data, base_config, allocation=allocation, batch_size=batch_size, **calibrate_kwargs)
    config = lora_config_from_plan(plan, base_config, model=model)
    config.fimlora_plan = plan
    return config


def _plan_of(peft_model, adapter_name: str) -> RankPlan | None:
    """The plan a fimlora route left on a PEFT model or on its adapter's config."""
    plan = getattr(peft_model, "fimlora_plan", None)
    if plan is None:
        config = getattr(peft_model, "peft_config", {}).get(adapter_name)
        plan = getattr(config, "fimlora_plan", None)
    return plan


def _check_plan_matches(peft_model, plan: RankPlan, adapter_name: str) -> None:
    """The adapter's LoRA layers are the plan's layers of rank > 0, with the planned ranks."""
    inner = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    actual = {name: module.r[adapter_name] for name, module in inner.named_modules()
              if is_lora_layer(module) and adapter_name in module.r}
    planned = {name: rank for name, rank in plan.ranks.items() if rank > 0}
    if actual == planned:
        return
    problems = [f"{name}: adapter rank {actual.get(name, 'none')}, plan rank {planned.get(name, 'none')}"
                for name in sorted(set(actual) | set(planned)) if actual.get(name) != planned.get(name)]
    shown = "\n  ".join(problems[:10]) + (f"\n  ... {len(problems) - 10} more" if len(problems) > 10 else "")
    raise PlanMismatchError(
        f"the plan does not describe adapter {adapter_name!r} ({len(problems)} layer(s) differ); pass the plan this "
        f"adapter was built from (peft_model.fimlora_plan, or config.fimlora_plan of fimlora.lora_config)\n  {shown}")


def _resolve(plan: RankPlan | None, peft_model, adapter_name: str) -> RankPlan:
    plan = plan if plan is not None else _plan_of(peft_model, adapter_name)
    if plan is None:
        raise ValueError("no rank plan given and none found on the model: pass plan= (the RankPlan the adapter was "
                         "built from), or build the adapter with fimlora.get_peft_model / fimlora.lora_config")
    _check_plan_matches(peft_model, plan, adapter_name)
    return plan


def save_pretrained(peft_model, directory: str | Path, *, plan: RankPlan | None = None,
                    adapter_name: str = "default", **kwargs) -> Path:
    """``peft_model.save_pretrained(directory, **kwargs)`` plus the plan as ``fimlora_plan.json``.

    ``plan`` defaults to the one fimlora left on the model (``peft_model.fimlora_plan``, or the
    config's from :func:`lora_config`); it is checked against the adapter's ranks before anything is
    written. With ``is_main_process=False`` (other ranks of a distributed job) nothing is written.
    """
    plan = _resolve(plan, peft_model, adapter_name)
    directory = Path(directory)
    peft_model.save_pretrained(str(directory), **kwargs)
    if kwargs.get("is_main_process", True):
        plan.save(directory / PLAN_FILE)
    return directory


class PlanCallback(TrainerCallback):
    """Writes the rank plan beside the adapter: into every checkpoint the trainer saves and into
    ``args.output_dir`` when training ends (where ``trainer.save_model()`` puts the adapter).

    ``plan`` defaults to the one fimlora left on the trained model (see :func:`save_pretrained`);
    either way it is checked against the adapter's ranks when training begins, so a plan from
    another calibration is refused before any step is spent.
    """

    def __init__(self, plan: RankPlan | None = None, *, adapter_name: str = "default") -> None:
        self.plan = plan
        self.adapter_name = adapter_name

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            if self.plan is None:
                raise ValueError("PlanCallback() was given no plan and the trainer passed no model to find it on")
            return
        self.plan = _resolve(self.plan, model, self.adapter_name)

    def _write(self, args, state, directory: Path) -> None:
        if self.plan is not None and state.is_world_process_zero and directory.is_dir():
            self.plan.save(directory / PLAN_FILE)

    def on_save(self, args, state, control, **kwargs):
        self._write(args, state, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        directory = Path(args.output_dir)
        if state.is_world_process_zero:
            directory.mkdir(parents=True, exist_ok=True)
        self._write(args, state, directory)

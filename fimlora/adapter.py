"""From a RankPlan to a standard PEFT LoRA adapter (DESIGN §7).

Keys of ``rank_pattern``/``alpha_pattern`` are anchored full module names (``^`` + escaped
name): PEFT matches pattern keys with ``re.match(rf"(.*\\.)?({key})$", name)``, so the anchor
pins a key to exactly that module. Every key is checked against the model before use.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

from torch import nn

from ._io import atomic_directory
from .modelinfo import AUTO_CLASSES, PEFT_TASK_TYPES, head_kwargs, head_modules, model_task
from .plan import PlanError, RankPlan
from .targets import is_conv1d, is_linear_like, is_lora_layer, layer_shape

logger = logging.getLogger("fimlora")


class PlanMismatchError(ValueError):
    """The plan does not fit the model it is applied to."""


def pattern_key(name: str) -> str:
    return "^" + re.escape(name)


def check_plan_fits(model: nn.Module, plan: RankPlan) -> dict[str, nn.Module]:
    """Every planned layer exists in ``model`` and is linear-like with the planned shape (its
    anchored pattern key then matches that one module and no other). Raises PlanMismatchError
    listing every problem; returns the planned modules by name."""
    modules = dict(model.named_modules())
    problems = []
    for layer in plan.layers:
        module = modules.get(layer.name)
        if module is None:
            problems.append(f"{layer.name}: no such module")
            continue
        if not (is_linear_like(module) or is_lora_layer(module)):
            problems.append(f"{layer.name}: is a {type(module).__name__}, not a linear layer")
            continue
        shape = layer_shape(module)
        if shape != (layer.d_in, layer.d_out):
            problems.append(f"{layer.name}: model has (d_in, d_out) = {shape}, plan has {(layer.d_in, layer.d_out)}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else "")
        raise PlanMismatchError(
            f"the rank plan does not fit this model ({len(problems)} problem(s)); was it made for another model? Calibrate this model to get a plan for it.\n  {shown}"
        )
    return {layer.name: modules[layer.name] for layer in plan.layers}


def lora_config_from_plan(plan: RankPlan, base_config=None, model: nn.Module | None = None):
    """A ``peft.LoraConfig`` that gives every planned layer its rank and alpha.

    Other settings (dropout, bias, task_type, modules_to_save, init ...) come from
    ``base_config``; its ``use_rslora=True`` needs a plan with alpha policy "rslora". Layers of rank 0 are left out (PEFT rejects r=0). With ``model`` given, the
    plan is checked against it first.
    """
    from peft import LoraConfig

    planned = check_plan_fits(model, plan) if model is not None else None
    kept = [layer for layer in plan.layers if layer.rank > 0]
    if not kept:
        raise PlanMismatchError("every layer of the plan has rank 0: there is no adapter to build")
    config = copy.deepcopy(base_config) if base_config is not None else LoraConfig()
    if getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
        logger.warning("base_config's rank_pattern/alpha_pattern are replaced by the plan")
    if getattr(config, "use_rslora", False) and plan.alpha_policy != "rslora":
        # PEFT would scale every layer by alpha/sqrt(r), which the plan's alphas do not assume
        raise PlanMismatchError(
            f"base_config has use_rslora=True but the plan's alpha policy is {plan.alpha_policy!r}; make the plan "
            "with AllocationConfig(alpha_policy='rslora') (or from this LoraConfig), or pass use_rslora=False")
    _set_task(config, plan, model)
    config.r = plan.base_rank
    config.lora_alpha = plan.base_alpha
    config.use_rslora = plan.alpha_policy == "rslora"  # the plan's alphas assume the policy's scale
    config.target_modules = [layer.name for layer in kept]
    config.rank_pattern = {pattern_key(layer.name): layer.rank for layer in kept}
    config.alpha_pattern = {pattern_key(layer.name): layer.alpha for layer in kept}
    if planned is not None and all(is_conv1d(planned[layer.name]) for layer in kept):
        config.fan_in_fan_out = True  # Conv1D stores its weight (d_in, d_out); PEFT needs to know
    return config


def check_task_type(config, task: str | None) -> str | None:
    """PEFT's task_type for a calibration ``task``; a ``config.task_type`` that contradicts it is refused."""
    wanted = PEFT_TASK_TYPES.get(task)
    given = getattr(config, "task_type", None)
    given = getattr(given, "value", given)  # PEFT's TaskType enum or its string
    if wanted is not None and given is not None and given != wanted:
        raise PlanMismatchError(
            f"LoraConfig(task_type={given!r}) contradicts the calibration task {task} (task_type={wanted!r}); "
            f"pass task_type={wanted!r} (or None), or calibrate with the task you train (task=...)")
    return wanted


def _set_task(config, plan: RankPlan, model: nn.Module | None) -> None:
    """The task the plan was calibrated for sets PEFT's task_type (so the right PeftModel class
    wraps the model, and AutoPeftModelFor... reloads it) and, for sequence classification, a trainable
    head (modules_to_save), unless the base config says otherwise; a contradicting task_type is refused."""
    task = plan.calibration.get("task")
    wanted = check_task_type(config, task)
    if wanted is None:  # a custom loss_fn: the user knows what they calibrated for
        return
    config.task_type = wanted
    if task == "seq-cls" and model is not None and getattr(config, "modules_to_save", None) is None:
        heads = head_modules(model, {layer.name for layer in plan.layers if layer.rank > 0})
        if heads:
            config.modules_to_save = heads  # a fresh head that stayed frozen would never learn


def apply_plan(model: nn.Module, plan: RankPlan, base_config=None):
    """Wrap ``model`` in a PEFT LoRA adapter shaped by ``plan`` (``peft.get_peft_model``)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config_from_plan(plan, base_config, model=model))


def export_for_serving(peft_model, directory: str | Path, *, adapter_name: str = "default", overwrite: bool = False,
                       max_lora_rank: int | None = None) -> Path:
    """Save an adapter that every runtime scales the same way.

    Servers such as vLLM apply one global scale lora_alpha / r and ignore ``alpha_pattern``.
    Here each layer's own scale is folded into its lora_B, relative to that global scale, and
    alpha_pattern is rewritten so that PEFT also computes exactly lora_alpha / r for every layer
    (use_rslora off). Loading the result with PEFT gives the same outputs as ``peft_model``.
    ``max_lora_rank`` (the server's, e.g. vLLM's ``--max-lora-rank``: it sizes every slot by it
    and pads smaller ranks) is checked against every layer's rank before anything is written.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if max_lora_rank is not None:
        _check_max_lora_rank(peft_model, adapter_name, max_lora_rank)
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    global_scale = config.lora_alpha / config.r
    state = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items()}
    alpha_pattern = {}
    for name, module in peft_model.base_model.model.named_modules():
        if not is_lora_layer(module) or adapter_name not in module.lora_A:
            continue
        rank = module.r[adapter_name]
        key = f"base_model.model.{name}.lora_B.weight"
        state[key] = state[key] * (module.scaling[adapter_name] / global_scale)
        alpha_pattern[pattern_key(name)] = config.lora_alpha * rank / config.r
    config.use_rslora = False
    config.alpha_pattern = alpha_pattern
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file(state, str(Path(tmp) / "adapter_model.safetensors"))
    return directory


def _check_max_lora_rank(peft_model, adapter_name: str, max_lora_rank: int) -> None:
    if isinstance(max_lora_rank, bool) or not isinstance(max_lora_rank, int) or max_lora_rank < 1:
        raise ValueError(f"max_lora_rank={max_lora_rank!r} must be a positive integer (the server's limit)")
    over = [(name, module.r[adapter_name]) for name, module in peft_model.base_model.model.named_modules()
            if is_lora_layer(module) and adapter_name in module.r and module.r[adapter_name] > max_lora_rank]
    if over:
        shown = ", ".join(f"{name} has rank {rank}" for name, rank in over[:5]) + (
            f" (and {len(over) - 5} more)" if len(over) > 5 else "")
        raise ValueError(
            f"{len(over)} layer(s) exceed max_lora_rank={max_lora_rank}: {shown}; re-plan with "
            f"AllocationConfig(r_max={max_lora_rank}), or raise the server's limit (vLLM: --max-lora-rank "
            f"{max(rank for _, rank in over)})")


PLAN_FILE = "fimlora_plan.json"


def _adapter_plan(directory: Path) -> RankPlan:
    path = directory / PLAN_FILE
    if not path.is_file():
        raise PlanMismatchError(f"{directory} has no {PLAN_FILE}, so fimlora cannot check it; load it with "
                                "peft.PeftModel.from_pretrained, or point at the directory fimlora wrote")
    return RankPlan.load(path)


def check_adapter(base_model: nn.Module, directory: str | Path) -> RankPlan:
    """Check that the adapter fimlora wrote in ``directory`` fits ``base_model`` before PEFT loads it.

    PEFT loads an adapter onto the wrong model class (``AutoModel`` instead of the sequence
    classifier) without complaint: the anchored rank_pattern keys then match nothing and every layer
    silently gets the uniform rank. Here the plan's record is compared with the model: its class (the
    task it was built for), its head (num_labels) and every planned layer's name and shape. Raises
    PlanMismatchError in one line naming the expected class and how to load it; returns the plan."""
    directory = Path(directory)
    plan = _adapter_plan(directory)
    record = plan.calibration
    expected_task, expected_class = record.get("task"), record.get("model_class")
    auto = record.get("auto_class") or AUTO_CLASSES.get(expected_task)
    kwargs = head_kwargs(record)
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k in ("num_labels", "problem_type"))
    fix = (f"load the base with transformers.{auto}.from_pretrained(base{', ' + shown if shown else ''})"
           if auto else "load the base model the adapter was calibrated on")
    actual_class = type(getattr(base_model, "get_base_model", lambda: base_model)()).__name__
    if expected_task in AUTO_CLASSES and model_task(base_model) != expected_task:
        raise PlanMismatchError(
            f"the adapter in {directory} was built for a {expected_class or expected_task} ({expected_task}), "
            f"but this base model is a {actual_class}; {fix}")
    config = getattr(base_model, "config", None)
    if "num_labels" in kwargs and getattr(config, "num_labels", None) != kwargs["num_labels"]:
        raise PlanMismatchError(
            f"the adapter in {directory} has a head of num_labels={kwargs['num_labels']}, but this base model has "
            f"num_labels={getattr(config, 'num_labels', None)}; {fix} (fimlora.base_model_kwargs gives them all)")
    try:
        check_plan_fits(base_model, plan)
    except PlanMismatchError as error:
        first = str(error).split("\n")[1].strip() if "\n" in str(error) else str(error)
        raise PlanMismatchError(f"the adapter in {directory} does not fit this {actual_class} ({first}); {fix}") from None
    return plan


def load_adapter(base_model: nn.Module, directory: str | Path, **peft_kwargs):
    """``peft.PeftModel.from_pretrained(base_model, directory, **peft_kwargs)`` after
    :func:`check_adapter`: a base of the wrong class, head or shapes is refused instead of loading
    a silently uniform adapter. ``is_trainable=True`` to train it further."""
    from peft import PeftModel

    plan = check_adapter(base_model, directory)
    model = PeftModel.from_pretrained(base_model, str(directory), **peft_kwargs)
    model.fimlora_plan = plan
    return model


def base_model_kwargs(directory: str | Path) -> dict:
    """The ``from_pretrained`` keyword arguments (num_labels, id2label, label2id, problem_type)
    that give a base model the head the adapter in ``directory`` was built with:
    ``AutoModelForSequenceClassification.from_pretrained(base, **fimlora.base_model_kwargs(out))``."""
    try:
        return head_kwargs(_adapter_plan(Path(directory)).calibration)
    except PlanError as error:
        raise PlanMismatchError(str(error)) from None


__all__ = [
    "PLAN_FILE",
    "PlanMismatchError",
    "base_model_kwargs",
    "apply_plan",
    "check_adapter",
    "check_plan_fits",
    "check_task_type",
    "export_for_serving",
    "load_adapter",
    "lora_config_from_plan",
]


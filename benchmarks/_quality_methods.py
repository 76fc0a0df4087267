"""The six ways to spend one LoRA parameter budget that the quality study compares.

Each builder takes the frozen classifier (head already initialised from the seed) and returns a
PEFT model plus a record of what it spent. Uniform r = 8 on the six BERT linears is the reference
budget (``Budget.mean_rank(8)``); every other method is given that budget in its own terms:

- fim-variance / fim-fisher / random: fimlora's allocator, parameter budget, clamps [r/2, 2r].
- eva: PEFT's EVA, rho = 2 (cap 2r, like the clamps). EVA keeps the *sum of ranks* (8 per layer)
  fixed, not the parameter count, so its count is measured and recorded, not forced.
- adalora: PEFT's AdaLoRA, init_r = 12 -> target_r = 8 (its budget is again a rank sum); the final
  count is measured after training from the surviving singular values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fimlora import Budget, LayerPlan, RankPlan, allocate, apply_plan, calibrate, make_plan
from fimlora.targets import find_targets, layer_shape, plan_name

# The LoRA targets in BERT naming: q, k, v, attention output, MLP up and MLP down.
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
BASE_RANK = 8
BASE_ALPHA = 16.0
METHODS = ("uniform", "fim-variance", "fim-fisher", "eva", "adalora", "random")


@dataclass
class FimSettings:
    """Calibration and allocation knobs (the ablation axes); defaults are the library's."""

    num_batches: int = 8
    calib_rank: int = 8
    granularity: str = "sample"
    r_min: int | None = None  # None: the library default, base_rank // 2
    r_max: int | None = None  # None: 2 * base_rank
    temperature: float = 1.0

    def label(self) -> str:
        """A short stable name of the non-default settings ("" for the defaults)."""
        parts = []
        for key, default in (("num_batches", 8), ("calib_rank", 8), ("granularity", "sample"), ("r_min", None),
                             ("r_max", None), ("temperature", 1.0)):
            value = getattr(self, key)
            if value != default:
                parts.append(f"{key}={value}")
        return ",".join(parts)


@dataclass
class Built:
    """A ready model and what it costs."""

    model: nn.Module
    plan: RankPlan | None  # None for uniform/adalora (no plan object), EVA gets a plan from its ranks
    ranks: dict[str, int]
    extra: dict = field(default_factory=dict)


def lora_config(*, task_type: str = "SEQ_CLS", **overrides):
    from peft import LoraConfig

    # lora_dropout 0: the calibration sees the model in eval mode, and dropout would add noise to a
    # very short training run; the same for every method anyway.
    kwargs = dict(r=BASE_RANK, lora_alpha=BASE_ALPHA, lora_dropout=0.0, target_modules=list(TARGETS),
                  task_type=task_type, modules_to_save=["classifier"])
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def target_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {plan_name(name): layer_shape(module) for name, module in find_targets(model, TARGETS).items()}


def budget_total(model: nn.Module) -> int:
    total, _ = Budget.mean_rank(BASE_RANK).resolve(list(target_shapes(model).values()))
    return int(total)


def lora_parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable LoRA parameters, trainable head parameters) of a PEFT model."""
    lora = head = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_" in name:
            lora += p.numel()
        else:
            head += p.numel()
    return lora, head


def plan_from_ranks(ranks: dict[str, int], shapes: dict[str, tuple[int, int]], scores: dict[str, float] | None,
                    label: str) -> RankPlan:
    """A RankPlan for ranks chosen elsewhere (random scores, EVA), so every map plots the same way."""
    layers = [LayerPlan(name=n, d_in=shapes[n][0], d_out=shapes[n][1], rank=r, alpha=BASE_ALPHA * r / BASE_RANK,
                        score=float((scores or {}).get(n, 0.0))) for n, r in ranks.items()]
    total, _ = Budget.mean_rank(BASE_RANK).resolve(list(shapes.values()))
    return RankPlan(layers=layers, budget={"kind": "mean_rank", "value": float(BASE_RANK), "total": total},
                    base_rank=BASE_RANK, base_alpha=BASE_ALPHA, alpha_policy="fixed_scale",
                    calibration={"score": label}, versions={})


def fim_plan(model: nn.Module, calib_batches: list[dict], *, score: str, seed: int, fim: FimSettings) -> RankPlan:
    """Calibrate the frozen model and allocate the reference budget by ``score``."""
    result = calibrate(model, calib_batches, targets=TARGETS, task="seq-cls", num_batches=fim.num_batches,
                       rank=fim.calib_rank, seed=seed, score=score, granularity=fim.granularity, progress=False)
    return make_plan(result, base_rank=BASE_RANK, base_alpha=BASE_ALPHA, r_min=fim.r_min, r_max=fim.r_max,
                     temperature=fim.temperature, score=score)


def random_plan(model: nn.Module, seed: int, fim: FimSettings) -> RankPlan:
    """Random scores through the same allocator, budget and clamps as FIM-LoRA."""
    shapes = target_shapes(model)
    gen = torch.Generator().manual_seed(10_000 + seed)
    scores = torch.rand(len(shapes), generator=gen, dtype=torch.float64).tolist()
    total, costs = Budget.mean_rank(BASE_RANK).resolve(list(shapes.values()))
    r_min = BASE_RANK // 2 if fim.r_min is None else fim.r_min
    r_max = 2 * BASE_RANK if fim.r_max is None else fim.r_max
    ranks = allocate(scores, total, costs=costs, r_min=r_min, r_max=r_max, temperature=fim.temperature)
    return plan_from_ranks(dict(zip(shapes, ranks, strict=True)), shapes, dict(zip(shapes, scores, strict=True)), "random")


def build(method: str, model: nn.Module, calib_batches: list[dict], *, seed: int, total_steps: int,
          first_checkpoint: int, fim: FimSettings | None = None, task_type: str = "SEQ_CLS") -> Built:
    """Wrap ``model`` (frozen, head initialised) with the ``method``'s adapter at the reference budget.

    The seed is set right before PEFT creates the LoRA weights, so A is drawn from the same stream
    in every method (the shapes differ where ranks differ)."""
    fim = fim or FimSettings()
    extra: dict = {}
    if method == "uniform":
        torch.manual_seed(seed)
        from peft import get_peft_model

        peft_model = get_peft_model(model, lora_config(task_type=task_type))
        ranks = {n: BASE_RANK for n in target_shapes(model)}
        return Built(peft_model, None, ranks, extra)
    if method in ("fim-variance", "fim-fisher", "random"):
        if method == "random":
            plan = random_plan(model, seed, fim)
        else:
            plan = fim_plan(model, calib_batches, score=method.split("-")[1], seed=seed, fim=fim)
            extra["calib_seconds"] = plan.calibration.get("seconds")
        torch.manual_seed(seed)
        peft_model = apply_plan(model, plan, lora_config(task_type=task_type))
        return Built(peft_model, plan, plan.ranks, extra)
    if method == "eva":
        return _build_eva(model, calib_batches, seed=seed, task_type=task_type)
    if method == "adalora":
        return _build_adalora(model, seed=seed, total_steps=total_steps, task_type=task_type,
                              first_checkpoint=first_checkpoint)
    raise ValueError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}")


def _build_eva(model: nn.Module, calib_batches: list[dict], *, seed: int, task_type: str) -> Built:
    from peft import EvaConfig, get_peft_model, initialize_lora_eva_weights

    shapes = target_shapes(model)
    # Sequence labels are one per row, not per token, so EVA's label mask does not apply.
    config = lora_config(task_type=task_type, init_lora_weights="eva",
                         eva_config=EvaConfig(rho=2.0, use_label_mask=False))
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in calib_batches]
    initialize_lora_eva_weights(peft_model, batches, show_progress_bar=False)
    ranks = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            ranks[plan_name(name)] = int(module.r["default"])
    ranks = {n: ranks.get(n, 0) for n in shapes}  # EVA may drop a layer (rank 0)
    return Built(peft_model, plan_from_ranks(ranks, shapes, None, "eva"), ranks, {})


def _build_adalora(model: nn.Module, *, seed: int, total_steps: int, task_type: str, first_checkpoint: int) -> Built:
    from peft import AdaLoraConfig, get_peft_model

    # The final mask is forced at step index total_step - tfinal; putting that on the last step
    # before the first selection checkpoint means every checkpoint has AdaLoRA's final budget.
    tinit = max(1, round(0.1 * total_steps))
    tfinal = total_steps - first_checkpoint + 1
    config = AdaLoraConfig(init_r=12, target_r=BASE_RANK, tinit=tinit, tfinal=tfinal,
                           deltaT=max(1, round(0.05 * total_steps)), total_step=total_steps, lora_alpha=BASE_ALPHA,
                           lora_dropout=0.0, target_modules=list(TARGETS), task_type=task_type,
                           modules_to_save=["classifier"])
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    return Built(peft_model, None, {}, {"adalora": True})


def adalora_final_ranks(peft_model: nn.Module) -> dict[str, int]:
    """Ranks AdaLoRA kept: the number of non-zero singular values E in each layer."""
    ranks = {}
    for name, module in peft_model.named_modules():
        lora_e = getattr(module, "lora_E", None)
        if lora_e is not None and "default" in lora_e:
            ranks[plan_name(name)] = int((lora_e["default"].detach() != 0).sum())
    return ranks


def lora_params_of(ranks: dict[str, int], shapes: dict[str, tuple[int, int]], *, adalora: bool = False) -> int:
    """Parameters of a rank map: r (d_in + d_out) per layer, plus r for AdaLoRA's singular values."""
    return sum(r * (shapes[n][0] + shapes[n][1] + (1 if adalora else 0)) for n, r in ranks.items())


def rank_summary(ranks: dict[str, int]) -> str:
    values = list(ranks.values())
    if not values:
        return ""
    mean = sum(values) / len(values)
    return f"{min(values)}/{mean:.2f}/{max(values)}"


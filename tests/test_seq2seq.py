"""Encoder-decoder models (T5, BART): task "seq2seq-lm", each sample's loss the mean cross-entropy
of its own target tokens; checked against the float64 per-sample PEFT oracle."""

from __future__ import annotations

import json

import pytest
import torch
from models import seq2seq_batches, seq2seq_samples, tiny_bart, tiny_t5
from oracle import moments, oracle_grads, relative_error
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import fimlora
from fimlora.cli import main
from fimlora.plan import RankPlan

TOL = 2e-5


@pytest.mark.parametrize("make_model", [tiny_t5, tiny_bart], ids=["t5", "bart"])
def test_seq2seq_matches_float64_oracle(make_model):
    model = make_model()
    samples = seq2seq_samples(7, seed=3)
    result = fimlora.calibrate(model, seq2seq_batches(samples, 4), rank=4, alpha=8.0, progress=False)
    assert result.settings.task == "seq2seq-lm"
    names = list(result.stats)
    assert any(".encoder." in f".{n}" for n in names) and any(".decoder." in f".{n}" for n in names)
    grads = oracle_grads(model, samples, names, rank=4, alpha=8.0, task="seq2seq-lm")
    worst = 0.0
    for name in names:
        expected, stats = moments(grads[name]), result.stats[name]
        assert stats.count == len(samples), name
        for key, actual in (("mean", stats.mean), ("variance", stats.variance())):
            worst = max(worst, relative_error(actual, expected[key]))
    print(f"{make_model.__name__}: worst relative error against the float64 oracle {worst:.2e}")
    assert worst < TOL


def test_equal_source_and_target_lengths():
    """Encoder and decoder then see the same number of positions: both are whole rows."""
    samples = [(torch.arange(3, 9), torch.arange(10, 16)), (torch.arange(20, 24), torch.arange(30, 36))]
    model = tiny_t5()
    result = fimlora.calibrate(model, seq2seq_batches(samples, 2), rank=4, alpha=8.0, progress=False)
    grads = oracle_grads(model, samples, list(result.stats), rank=4, alpha=8.0, task="seq2seq-lm")
    for name, g in grads.items():
        assert relative_error(result.stats[name].variance(), moments(g)["variance"]) < TOL, name


def test_seq2seq_needs_labels_and_right_padding():
    model = tiny_t5()
    batch = seq2seq_batches([(torch.arange(3, 9), torch.arange(3, 6)), (torch.arange(3, 6), torch.arange(3, 9))], 2)[0]
    with pytest.raises(ValueError, match="labels"):
        fimlora.calibrate(model, [{k: v for k, v in batch.items() if k != "labels"}], progress=False)
    left = dict(batch, attention_mask=batch["attention_mask"].flip(1), input_ids=batch["input_ids"].flip(1))
    with pytest.raises(ValueError, match="pad on the right"):
        fimlora.calibrate(model, [left], progress=False)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, minilm_dir):
    """A tiny T5 saved with the embedded BERT tokenizer's vocabulary."""
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    config = T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_ff=48, num_layers=2, num_heads=4, d_kv=8,
                      pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                      dropout_rate=0.0)
    directory = tmp_path_factory.mktemp("t5")
    T5ForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


SOURCES = ["translate: the cat sat", "summarise: a long story about dogs and more dogs", "hello there", "yes",
           "the quick brown fox jumps", "a b c d e f g"]
TARGETS = ["le chat", "dogs", "bonjour a vous tous", "oui", "le renard", "a"]


def test_cli_calibrates_an_encoder_decoder(t5_dir, tmp_path, capsys):
    """`fimlora calibrate --target-column`: the plan equals what Python computes on batches made
    by hand with the tokenizer, and the adapter loads onto the model with vanilla PEFT."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"source": s, "target": t}) for s, t in zip(SOURCES, TARGETS, strict=True)))
    out = tmp_path / "out"
    assert main(["calibrate", "--model", str(t5_dir), "--data", str(data), "--text-column", "source",
                 "--target-column", "target", "--num-batches", "2", "--batch-size", "3", "--rank", "4",
                 "--out", str(out), "--quiet"]) == 0
    plan = RankPlan.load(out / "fimlora_plan.json")
    assert plan.calibration["task"] == "seq2seq-lm" and plan.calibration["samples"] == 6
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"

    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    batches = []
    for i in (0, 3):
        encoded = tokenizer(SOURCES[i : i + 3], padding=True, return_tensors="pt", return_token_type_ids=False)
        targets = tokenizer(text_target=TARGETS[i : i + 3], padding=True, return_tensors="pt")
        labels = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, -100)
        batches.append({**encoded, "labels": labels})
    model = AutoModelForSeq2SeqLM.from_pretrained(t5_dir)
    expected = fimlora.make_plan(fimlora.calibrate(model, batches, num_batches=2, progress=False), base_rank=4)
    assert plan.ranks == expected.ranks
    for ours, theirs in zip(plan.layers, expected.layers, strict=True):
        assert ours.score == pytest.approx(theirs.score, rel=1e-5), ours.name
    loaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(t5_dir), out)
    assert loaded(**batches[0]).logits.shape[:2] == batches[0]["labels"].shape


def test_cli_seq2seq_without_targets_fails_before_loading(t5_dir, tmp_path, capsys):
    data = tmp_path / "sources.txt"
    data.write_text("a sentence\nanother one\n")
    assert main(["calibrate", "--model", str(t5_dir), "--data", str(data), "--out", str(tmp_path / "o")]) == 1
    assert "--target-column" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

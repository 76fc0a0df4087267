"""Real pretrained weights: all-MiniLM-L6-v2 (embedded package) and stories260K (../shared)."""

from __future__ import annotations

import pytest
import torch
from conftest import require
from oracle import moments, oracle_grads, relative_error
from stories import STORIES_DIR, load_stories260k, load_stories_tokenizer, stories_available

import fimlora
from fimlora.cli import main
from fimlora.data import builtin_examples, encode_examples, make_batches
from fimlora.plan import RankPlan

TOL = 5e-5


def _check_against_oracle(result, model, samples, task, rank=8, alpha=8.0):
    grads = oracle_grads(model, samples, list(result.stats), rank=rank, alpha=alpha, task=task)
    worst = 0.0
    for name, g in grads.items():
        expected = moments(g)
        stats = result.stats[name]
        assert stats.count == len(samples)
        for key, actual in (("mean", stats.mean), ("variance", stats.variance()), ("fisher", stats.fisher())):
            worst = max(worst, relative_error(actual, expected[key]))
    assert worst < TOL, worst
    return worst


def test_minilm_classifier_matches_float64_oracle(minilm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    examples = builtin_examples()
    features = encode_examples(examples, tokenizer, task="seq-cls", max_length=32)[:12]
    batches = make_batches(features, batch_size=4, pad_token_id=tokenizer.pad_token_id)
    targets = ["value", "output.dense"]
    result = fimlora.calibrate(model, batches, targets=targets, num_batches=3, progress=False)
    assert len(result.stats) == 18  # value, attention.output.dense and output.dense in 6 blocks
    # the oracle runs each sample alone, unpadded, with BERT's default (zero) token types
    samples = [(f["input_ids"], f["labels"]) for f in features]
    worst = _check_against_oracle(result, model, samples, "seq-cls")
    print(f"all-MiniLM-L6-v2: worst relative error against float64 oracle {worst:.2e}")


@pytest.fixture(scope="module")
def stories():
    require(stories_available(), "../shared/models/stories260K not present")
    return load_stories260k(STORIES_DIR), load_stories_tokenizer(STORIES_DIR)


STORY_LINES = [
    "Once upon a time, there was a little dog named Max.",
    "Tom and Sue went to the park to play with a big red ball.",
    "The sun was hot, so the cat slept under the tree all day.",
    "Lily found a shiny stone and showed it to her mom.",
    "One day, a bird flew into the house and sang a happy song.",
    "Ben was sad because his toy was broken, but his dad fixed it.",
]


def test_stories260k_matches_float64_oracle(stories):
    model, tokenizer = stories
    ids = [torch.tensor([1] + tokenizer(line)["input_ids"]) for line in STORY_LINES]
    samples = [(x, None) for x in ids]
    from models import batches_of

    result = fimlora.calibrate(model, batches_of(samples, 3), num_batches=2, progress=False)
    assert len(result.stats) == 35  # 5 blocks x 7 projections; the tied head is not a target
    worst = _check_against_oracle(result, model, samples, "causal-lm")
    print(f"stories260K: worst relative error against float64 oracle {worst:.2e}")


def test_cli_on_stories260k(stories, tmp_path, capsys):
    model, tokenizer = stories
    model_dir = tmp_path / "stories"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "stories.txt"
    data.write_text("\n".join(STORY_LINES * 4))
    out = tmp_path / "out"
    assert main(["calibrate", "--model", str(model_dir), "--data", str(data), "--out", str(out),
                 "--batch-size", "4", "--num-batches", "4", "--quiet"]) == 0
    plan = RankPlan.load(out / "fimlora_plan.json")
    assert plan.calibration["task"] == "causal-lm" and len(plan.layers) == 35
    assert plan.budget_used <= plan.budget_total

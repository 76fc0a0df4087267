"""Encoder-decoder models (T5, BART): task "seq2seq-lm", each sample's loss the mean cross-entropy
of its own target tokens; checked against the float64 per-sample PEFT oracle."""

from __future__ import annotations

import pytest
import torch
from models import seq2seq_batches, seq2seq_samples, tiny_bart, tiny_t5
from oracle import moments, oracle_grads, relative_error

import fimlora

TOL = 2e-5


@pytest.mark.parametrize("make_model", [tiny_t5, tiny_bart], ids=["t5", "bart"])
def test_seq2seq_matches_float64_oracle(make_model):
    model = make_model()
    samples = seq2seq_samples(7, seed=3)
    result = fimlora.calibrate(model, seq2seq_batches(samples, 4), rank=4, alpha=8.0, progress=False)
    assert result.settings["task"] == "seq2seq-lm"
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


def test_cli_names_the_python_route_for_seq2seq_models(tmp_path, capsys):
    from fimlora.cli import main

    tiny_t5().save_pretrained(tmp_path / "t5")
    text = tmp_path / "data.txt"
    text.write_text("a sentence\nanother one\n")
    assert main(["calibrate", "--model", str(tmp_path / "t5"), "--data", str(text), "--out", str(tmp_path / "o")]) == 1
    assert "task='seq2seq-lm'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

"""The pieces of the quality study (benchmarks/quality.py): reader, metrics, CI, budgets, resume."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

quality = pytest.importorskip("quality")
scipy = pytest.importorskip("scipy")
from _quality_methods import (  # noqa: E402
    BASE_RANK,
    METHODS,
    budget_total,
    build,
    lora_parameter_counts,
    lora_params_of,
    target_shapes,
)
from _quality_stats import agreement, paired_ci  # noqa: E402
from _quality_tasks import (  # noqa: E402
    TaskSpec,
    accuracy,
    f1_binary,
    glue_tasks,
    label_vocabulary,
    load_task,
    matthews,
    read_table,
    score_predictions,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---- reader --------------------------------------------------------------------------------------

def test_reader_with_header_and_bom(tmp_path):
    path = tmp_path / "train.tsv"
    # A BOM, a literal quote inside a field (GLUE files are unquoted) and a pair column.
    path.write_text('\ufeffQuality\t#1 String\t#2 String\n1\tHe said "hi"\tHi\n0\ta\tb\n', encoding="utf-8")
    spec = TaskSpec("t", str(path), str(path), "#1 String", "Quality", pair="#2 String")
    ex = read_table(path, spec)
    assert ex.texts == ['He said "hi"', "a"] and ex.pairs == ["Hi", "b"] and ex.labels == ["1", "0"]


def test_reader_without_header_uses_indices(tmp_path):
    path = tmp_path / "cola.tsv"
    path.write_text("src\t1\t\tgood sentence .\nsrc\t0\t*\tbad sentence .", encoding="utf-8")  # no final newline
    spec = TaskSpec("t", str(path), str(path), "3", "1", header=False, metric="matthews")
    ex = read_table(path, spec)
    assert ex.texts == ["good sentence .", "bad sentence ."] and ex.labels == ["1", "0"] and ex.pairs is None
    with pytest.raises(ValueError, match="0-based index"):
        read_table(path, TaskSpec("t", str(path), str(path), "sentence", "1", header=False))


def test_reader_csv_and_unknown_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,score\n"a, b",0.5\nc,1.5\n', encoding="utf-8")
    spec = TaskSpec("t", str(path), str(path), "text", "score", metric="pearson_spearman")
    ex = read_table(path, spec)
    assert ex.texts == ["a, b", "c"] and ex.labels == ["0.5", "1.5"] and spec.regression
    with pytest.raises(ValueError, match="no column 'label'"):
        read_table(path, TaskSpec("t", str(path), str(path), "text", "label"))


def test_label_vocabulary_orders_integers_numerically():
    assert label_vocabulary(["10", "2", "1"]) == ["1", "2", "10"]
    assert label_vocabulary(["not_entailment", "entailment"]) == ["entailment", "not_entailment"]


# ---- metrics -------------------------------------------------------------------------------------

def test_metrics_against_hand_computed_values():
    pred = [1, 1, 0, 0, 1, 0]
    gold = [1, 0, 0, 1, 1, 0]
    # tp=2, fp=1, fn=1, tn=2
    assert accuracy(pred, gold) == pytest.approx(4 / 6)
    assert f1_binary(pred, gold) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert matthews(pred, gold) == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    assert matthews([1, 1, 1], [1, 0, 1]) == 0.0  # a constant prediction has no correlation
    spec = TaskSpec("m", "x", "x", "a", "b", metric="f1_accuracy")
    assert score_predictions(spec, pred, gold)["score"] == pytest.approx((4 / 6 + 2 / 3) / 2)


def test_regression_metric_is_mean_of_pearson_and_spearman():
    spec = TaskSpec("r", "x", "x", "a", "b", metric="pearson_spearman")
    out = score_predictions(spec, [1.0, 2.0, 3.0, 5.0], [1.0, 2.0, 3.0, 4.0])
    assert out["spearman"] == pytest.approx(1.0) and 0.9 < out["pearson"] < 1.0
    assert out["score"] == pytest.approx((out["pearson"] + 1.0) / 2)


# ---- statistics ----------------------------------------------------------------------------------

def test_paired_ci_against_hand_computed_example():
    # d = [1, 2, 3, 4]: mean 2.5, sd sqrt(5/3), t_{0.975, 3} = 3.182446
    ci = paired_ci([1, 2, 3, 4], [0, 0, 0, 0])
    half = 3.182446 * math.sqrt(5 / 3) / 2
    assert ci["mean"] == pytest.approx(2.5) and ci["n"] == 4
    assert ci["low"] == pytest.approx(2.5 - half, abs=1e-5) and ci["high"] == pytest.approx(2.5 + half, abs=1e-5)
    assert 0 < ci["p"] < 0.05


def test_agreement_of_rank_maps():
    rho, tau = agreement([1, 2, 3, 4], [10, 20, 30, 40])
    assert rho == pytest.approx(1.0) and tau == pytest.approx(1.0)
    assert all(math.isnan(v) for v in agreement([8, 8, 8], [1, 2, 3]))  # uniform has no order


# ---- budgets -------------------------------------------------------------------------------------

def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config).eval()


def _batches(n: int = 2):
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, 64, (8, 12), generator=gen),
             "attention_mask": torch.ones(8, 12, dtype=torch.long),
             "labels": torch.randint(0, 2, (8,), generator=gen)} for _ in range(n)]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_spends_the_reference_budget(method):
    model = _tiny_bert()
    shapes = target_shapes(model)
    assert len(shapes) == 2 * 6  # q, k, v, attention.output.dense, intermediate.dense, output.dense
    total = budget_total(model)
    assert total == BASE_RANK * sum(a + b for a, b in shapes.values())
    built = build(method, model, _batches(), seed=0, total_steps=20, first_checkpoint=10)
    lora, head = lora_parameter_counts(built.model)
    assert head == 32 * 2 + 2  # only the classifier head, the same in every method
    if method in ("uniform", "fim-variance", "fim-fisher", "random"):
        # The allocator never overspends and leaves less than one rank of the cheapest layer unused.
        assert total - min(a + b for a, b in shapes.values()) < lora <= total
        assert lora == lora_params_of(built.ranks, shapes)
    elif method == "eva":
        assert sum(built.ranks.values()) == BASE_RANK * len(shapes)  # EVA keeps the rank sum
        assert lora == lora_params_of(built.ranks, shapes)
    else:  # AdaLoRA trains init_r = 12 (+ E) until it prunes to target_r = 8
        assert lora == sum(12 * (a + b + 1) for a, b in shapes.values())


# ---- resumability --------------------------------------------------------------------------------

def test_rerun_skips_finished_cells(tmp_path, monkeypatch):
    calls = []

    def fake_cell(*, data, method, seed, **_):
        calls.append((method, seed))
        return {"task": data.spec.name, "method": method, "seed": seed, "score": 0.5, "lora_params": 1, "seconds": 0.0}

    class FakeCache:
        pad = 0

        def get(self, spec):
            return type("D", (), {"spec": spec, "train": [0] * 3})(), {}

    monkeypatch.setattr(quality, "run_cell", fake_cell)
    spec = TaskSpec("toy", "x", "x", "a", "b")
    cells = [(spec, m, "", quality.FimSettings(), s) for s in range(2) for m in ("uniform", "random")]
    path = tmp_path / "quality_main.csv"
    cfg = quality.TrainConfig(steps=1)
    quality.run_grid(cells[:3], quality.ResultsFile(path), FakeCache(), cfg)  # "killed" after three cells
    assert len(calls) == 3
    quality.run_grid(cells, quality.ResultsFile(path), FakeCache(), cfg)  # rerun: only the missing one
    assert calls[3:] == [("random", 1)]
    assert len(path.read_text().strip().splitlines()) == 1 + 4


# ---- the real GLUE files -------------------------------------------------------------------------

@pytest.mark.skipif(not DATA.exists(), reason="../shared/data is absent")
def test_glue_specs_read_the_shared_files():
    expected = {"sst2": (67_349, 872), "rte": (2_490, 277), "mrpc": (3_668, 408), "cola": (8_551, 1_043)}
    for name, spec in glue_tasks(DATA).items():
        data = load_task(spec, train_size=100, heldout_size=50)
        assert (data.train_rows, len(data.dev)) == expected[name]
        assert len(data.train) == 100 and len(data.heldout) == 50
        assert len(data.vocabulary) == 2

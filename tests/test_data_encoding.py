"""fimlora.data encoding and batches: tokenisation, labels, collation, batching."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from fimlora.data import (
    TextExamples,
    builtin_examples,
    collate,
    encode_examples,
    make_batches,
    pad_token_id_for,
)
from fimlora.modelio import _num_labels

# ---------------------------------------------------------------- encoding


def test_encode_causal_lm(minilm_tokenizer):
    examples = TextExamples(["a short one", "a somewhat longer sentence here"])
    features = encode_examples(examples, minilm_tokenizer, task="causal-lm", max_length=64)
    assert len(features) == 2
    for feature, text in zip(features, examples.texts, strict=True):
        assert set(feature) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert all(v.dtype == torch.long and v.dim() == 1 for v in feature.values())
        assert torch.equal(feature["labels"], feature["input_ids"])
        assert feature["labels"].data_ptr() != feature["input_ids"].data_ptr()  # a copy
        assert feature["input_ids"].tolist() == minilm_tokenizer(text)["input_ids"]
        assert feature["attention_mask"].tolist() == [1] * feature["input_ids"].numel()


def test_encode_pairs(minilm_tokenizer):
    examples = TextExamples(["first part"], ["second part"])
    (feature,) = encode_examples(examples, minilm_tokenizer, task="causal-lm", max_length=64)
    assert feature["input_ids"].tolist() == minilm_tokenizer("first part", "second part")["input_ids"]
    assert feature["token_type_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_truncation_warns_once_with_count(minilm_tokenizer):
    examples = TextExamples(["word " * 50, "short", "word " * 20])
    with pytest.warns(UserWarning) as record:
        features = encode_examples(examples, minilm_tokenizer, task="causal-lm", max_length=128, model_max_length=16)
    assert [str(w.message) for w in record] == [
        "2 of 3 examples were longer than the model's maximum of 16 tokens and were truncated"
    ]
    assert [f["input_ids"].numel() for f in features] == [16, 3, 16]
    assert features[0]["input_ids"][-1].item() == minilm_tokenizer.sep_token_id  # special tokens survive


def test_max_length_truncation_is_silent(minilm_tokenizer):
    examples = TextExamples(["word " * 50])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (feature,) = encode_examples(examples, minilm_tokenizer, task="causal-lm", max_length=10, model_max_length=512)
    assert feature["input_ids"].numel() == 10


def test_seq_cls_string_labels_sorted(minilm_tokenizer):
    examples = TextExamples(["a", "b", "c"], labels=["pos", "neg", "pos"])
    features = encode_examples(examples, minilm_tokenizer, task="seq-cls", max_length=16)
    assert [f["labels"].item() for f in features] == [1, 0, 1]
    assert all(f["labels"].dim() == 0 and f["labels"].dtype == torch.long for f in features)


def test_seq_cls_int_float_and_named_labels(minilm_tokenizer):
    ints = encode_examples(TextExamples(["a", "b"], labels=[2, 0]), minilm_tokenizer, task="seq-cls", max_length=8)
    assert [f["labels"].item() for f in ints] == [2, 0]
    floats = encode_examples(TextExamples(["a", "b"], labels=[0.25, 4]), minilm_tokenizer, task="seq-cls", max_length=8)
    assert [f["labels"].item() for f in floats] == [0.25, 4.0]
    assert floats[0]["labels"].dtype == torch.float32
    named = encode_examples(
        TextExamples(["a", "b", "c"], labels=["pos", "neg", 0]),
        minilm_tokenizer,
        task="seq-cls",
        max_length=8,
        label_names=["neg", "pos"],
    )
    assert [f["labels"].item() for f in named] == [1, 0, 0]


def test_seq_cls_label_errors(minilm_tokenizer):
    with pytest.raises(ValueError, match="seq-cls.*label column.*--label-column"):
        encode_examples(TextExamples(["a"]), minilm_tokenizer, task="seq-cls", max_length=8)
    with pytest.raises(ValueError, match=r"labels 'maybe' are not in label_names=\['neg', 'pos'\]"):
        encode_examples(TextExamples(["a"], labels=["maybe"]), minilm_tokenizer, task="seq-cls", max_length=8,
                        label_names=["neg", "pos"])
    with pytest.raises(ValueError, match="labels mix types"):
        encode_examples(TextExamples(["a", "b"], labels=["x", 1]), minilm_tokenizer, task="seq-cls", max_length=8)
    with pytest.raises(ValueError, match="label -1 is negative"):
        encode_examples(TextExamples(["a", "b"], labels=[-1, 1]), minilm_tokenizer, task="seq-cls", max_length=8)


def test_unknown_task_lists_tasks(minilm_tokenizer):
    with pytest.raises(ValueError, match=r"unknown task 'mlm'; choose one of: causal-lm, seq-cls"):
        encode_examples(TextExamples(["a"]), minilm_tokenizer, task="mlm", max_length=8)


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


def test_end_to_end_builtin_batches(minilm_tokenizer):
    features = encode_examples(builtin_examples(), minilm_tokenizer, task="seq-cls", max_length=64, model_max_length=512)
    batches = make_batches(features, batch_size=16, pad_token_id=pad_token_id_for(minilm_tokenizer), num_batches=8)
    assert len(batches) == 8
    assert sum(int(b["labels"].sum()) for b in batches) == 64
    first = batches[0]
    assert first["input_ids"].shape == first["attention_mask"].shape == first["token_type_ids"].shape
    assert (first["input_ids"][first["attention_mask"] == 0] == minilm_tokenizer.pad_token_id).all()


def test_pad_token_id_for():
    assert pad_token_id_for(types.SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    assert pad_token_id_for(types.SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id_for(types.SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


@pytest.mark.parametrize(("labels", "classes"), [([0, 2, 2], 3), ([1, 1, 1], 2), ([1, 2.5], 1), (["b", "a", "b"], 2)])
def test_head_size_follows_the_label_ids(labels, classes):
    """The classifier head gets as many classes as the encoded ids need (1: regression)."""
    assert _num_labels(TextExamples(texts=["x"] * len(labels), labels=labels)) == classes

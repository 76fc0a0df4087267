""".json array files, prompt/completion and chat examples for causal-LM calibration (loss on the
completion / assistant tokens only, as SFT trains): readers, encoding against TRL's SFTTrainer,
per-sample losses against transformers' own, and calibration against the float64 oracle."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import oracle
import pytest
import torch
import torch.nn.functional as F
from models import tiny_llama
from oracle import moments, oracle_grads, relative_error

import fimlora
from fimlora.data import TextExamples, encode_examples, make_batches, read_examples
from fimlora.data.chat import encode_chat, mask_source
from fimlora.data.prompts import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
from fimlora.losses import causal_lm_losses
from fimlora.samples import sample_layout

RANK, ALPHA = 4, 8.0
TOL = 2e-5  # float32 model and statistics against the float64 oracle, as in test_calibrate

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
WORDS = ("question answer is the sky blue green yes no true false what colour grass please choose a b c d of and "
         "to be helpful you are hello hi thanks : ? . , below instruction response").split()
# The same rendering twice: once with {% generation %} markers around each assistant turn's
# content and end token, once without (so the mask comes from prefix-by-prefix renderings).
MARKED_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> {% generation %}"
    "{{ m['content'] }} <|end|>{% endgeneration %} {% else %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
CHATS = [
    [{"role": "user", "content": "what colour is the sky ?"}, {"role": "assistant", "content": "blue"},
     {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "you are helpful ."}],
    [{"role": "system", "content": "be helpful"}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello , what is the question ?"}],
    [{"role": "user", "content": "grass ?"}, {"role": "assistant", "content": "green"}],
]
PAIRS = [("question : what colour is the sky ? answer :", " blue"),
         ("question : grass ? answer :", " green ."),
         ("please choose a b c or d : what is blue ?", " the sky is blue , a"),
         ("true or false : the sky is green ? answer :", " false")]


def tiny_tokenizer(chat_template: str | None = MARKED_TEMPLATE):
    """A word-level fast tokenizer (ids < the tiny models' vocabulary of 96) that adds BOS, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", additional_special_tokens=SPECIAL[4:])
    tokenizer.chat_template = chat_template
    return tokenizer


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, indent=4), encoding="utf-8")
    return path


def prompt_examples() -> TextExamples:
    return TextExamples([p for p, _ in PAIRS], completions=[c for _, c in PAIRS])


# ---------------------------------------------------------------- .json arrays


def test_json_array_reads_as_jsonl_does(tmp_path):
    rows = [{"text": "good", "label": 1, "other": "x"}, {"text": "bad", "label": 0, "other": "y"}]
    array = write_json(tmp_path / "a.json", rows)
    lines = tmp_path / "a.jsonl"
    lines.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    for options in ({}, {"text_column": "other", "text_pair_column": "text", "label_column": "label"}):
        assert read_examples(str(array), **options) == read_examples(str(lines), **options)
    assert read_examples(str(array), limit=1).texts == ["good"]
    with pytest.raises(ValueError, match=r"text_column='txt' is not a column of .*a\.json; available columns: text, label, other"):
        read_examples(str(array), text_column="txt")


@pytest.mark.parametrize(("content", "message"), [
    ('[{"text": "a"},\n {"text": "b"},\n {"label": 1}\n]', r"a\.json, item 3 \(line 3\): no value for column 'text'"),
    ('[{"text": "a"},\n ["b"]]', r"a\.json, item 2 \(line 2\): expected a JSON object, got list"),
    ('[{"text": "a"}\n {"text": "b"}]', r"a\.json, line 2: expected ',' or '\]' after item 1"),
    ('[{"text": "a"},\n {"text": "b"\n {"text": "c"}]', r"a\.json, line 3: invalid JSON in item 2 \(Expecting ',' delimiter\)"),
    ('[{"text": "a"},\n {"text": }]', r"a\.json, line 2: invalid JSON in item 2 \(Expecting value\)"),
    ('[{"text": "a"}] x', r"a\.json, line 1: unexpected text after the closing '\]'"),
    ('{"data": [{"text": "a"}]}', r"a\.json: expected a JSON array of objects .* got a JSON dict; .*name it \.jsonl"),
    ('{"text": "a"}\n{"text": "b"}', r"a\.json: expected a JSON array of objects .*JSON Lines"),
    ("[]", r"a\.json contains no examples"),
    ("  \n", r"a\.json contains no examples"),
])
def test_json_errors_name_the_item_and_line(tmp_path, content, message):
    path = tmp_path / "a.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_examples(str(path))


def test_real_llm_adapters_json_files(shared_dir):
    """ARC-Easy and BoolQ in LLM-Adapters' layout (instruction, input, output, answer): by default
    the Alpaca prompt over instruction/input with the output as completion; any column by name."""
    for name in ("ARC-Easy", "boolq"):
        path = shared_dir / "data" / name / "train.json"
        rows = json.loads(path.read_text(encoding="utf-8"))
        examples = read_examples(str(path), limit=50)
        assert len(examples) == 50 and examples.messages is None
        assert examples.texts == [ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"]) if not row["input"]
                                  else ALPACA_PROMPT.format(**row) for row in rows[:50]]
        assert examples.completions == [row["output"] for row in rows[:50]]
        plain = read_examples(str(path), text_column="instruction", label_column="answer", limit=5)
        assert (plain.texts, plain.labels) == ([r["instruction"] for r in rows[:5]], [r["answer"] for r in rows[:5]])
    whole = read_examples(str(shared_dir / "data" / "ARC-Easy" / "train.json"), prompt_column="instruction",
                          completion_column="answer")
    assert len(whole) == len(json.loads((shared_dir / "data" / "ARC-Easy" / "train.json").read_text()))


# ---------------------------------------------------------------- prompt/completion and chat layouts


def test_prompt_layouts(tmp_path):
    rows = [{"instruction": "say yes", "input": "", "output": "yes", "q": "sky?", "a": "blue"},
            {"instruction": "colour of", "input": "grass", "output": "green", "q": "grass?", "a": "green"}]
    path = write_json(tmp_path / "d.json", rows)
    alpaca = read_examples(str(path), prompt_template="alpaca")
    assert alpaca.texts == [ALPACA_PROMPT_NO_INPUT.format(instruction="say yes"),
                            ALPACA_PROMPT.format(instruction="colour of", input="grass")]
    assert alpaca.texts[1].endswith("### Input:\ngrass\n\n### Response:\n") and alpaca.completions == ["yes", "green"]
    assert read_examples(str(path)) == alpaca  # instruction + output columns: the alpaca layout by default
    assert read_examples(str(path)).columns == {"prompt_template": "alpaca", "completion_column": "output"}
    assert read_examples(str(path), prompt_template="alpaca", completion_column="a").completions == ["blue", "green"]
    own = read_examples(str(path), prompt_template="Q: {q}\nA: ", completion_column="a")
    assert (own.texts, own.completions) == (["Q: sky?\nA: ", "Q: grass?\nA: "], ["blue", "green"])
    columns = read_examples(str(path), prompt_column="q", completion_column="a")
    assert (columns.texts, columns.completions) == (["sky?", "grass?"], ["blue", "green"])
    assert columns.columns == {"prompt_column": "q", "completion_column": "a"}
    assert columns.select([1]) == TextExamples(["grass?"], completions=["green"])


@pytest.mark.parametrize(("options", "message"), [
    ({"prompt_column": "q"}, r"a prompt needs its completion: name completion_column= \(--completion-column\)"),
    ({"completion_column": "a"}, r"completion_column='a' needs the prompt it completes: name prompt_column="),
    ({"text_column": "q", "prompt_column": "q", "completion_column": "a"}, r"text_column='q' and a prompt .* two layouts"),
    ({"prompt_column": "q", "prompt_template": "{q}", "completion_column": "a"}, "give prompt_column='q' or prompt_template=, not both"),
    ({"messages_column": "m", "text_column": "q"}, r"messages_column='m' is a layout of its own .* drop text_column='q'"),
    ({"prompt_template": "Q: {question}", "completion_column": "a"}, r"needs the columns 'question', which .* lacks; available columns: q, a"),
    ({"prompt_template": "no fields", "completion_column": "a"}, r"prompt_template='no fields' names no column"),
    ({"prompt_template": "{q} {}", "completion_column": "a"}, r"\{\} is not a column name"),
    ({"prompt_template": "{q", "completion_column": "a"}, r"is not a valid format string"),
    ({"prompt_column": "q", "completion_column": "answer"}, r"completion_column='answer' is not a column of"),
])
def test_layout_errors_name_the_options(tmp_path, options, message):
    path = write_json(tmp_path / "a.json", [{"q": "sky?", "a": "blue"}])
    with pytest.raises(ValueError, match=message):
        read_examples(str(path), **options)


def test_chat_and_prompt_completion_columns_are_found_as_trl_finds_them(tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": chat, "id": i}) for i, chat in enumerate(CHATS)), encoding="utf-8")
    examples = read_examples(str(chats))
    assert examples.messages == CHATS and examples.completions is None
    assert examples.columns == {"messages_column": "messages"}
    assert examples.texts[2] == "user: grass ?\nassistant: green"
    assert read_examples(str(chats), messages_column="messages", limit=1).messages == CHATS[:1]
    pairs = write_json(tmp_path / "pairs.json", [{"prompt": p, "completion": c} for p, c in PAIRS])
    assert read_examples(str(pairs)) == prompt_examples()


@pytest.mark.parametrize(("conversation", "message"), [
    ("user: hi", r"item 1 \(line 1\): column 'messages' holds a string, not a list"),
    ([], r"column 'messages' must be a non-empty list .* got an empty list"),
    ([{"role": "user"}], r"message 1 of column 'messages' is not a \{'role': str, 'content': str\} dict"),
    ([{"role": "user", "content": "hi"}], r"has no 'assistant' message, so no token carries a loss"),
])
def test_bad_conversations_name_the_item(tmp_path, conversation, message):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"messages": conversation}]), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_examples(str(path))


# ---------------------------------------------------------------- encoding, against TRL's SFTTrainer


def _trl_batch(tokenizer, rows, output_dir, **config):
    """The batch TRL's SFTTrainer builds from ``rows`` (its dataset preparation and collator)."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    args = trl.SFTConfig(output_dir=str(output_dir), max_length=64, report_to="none", use_cpu=True, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=tiny_llama(), args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tokenizer)
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])


def _fimlora_batch(examples, tokenizer):
    features = encode_examples(examples, tokenizer, task="causal-lm", max_length=64)
    return make_batches(features, batch_size=len(features), pad_token_id=tokenizer.pad_token_id)[0]


def _assert_same_batch(ours, theirs):
    for key in ("input_ids", "attention_mask", "labels"):
        assert ours[key].tolist() == theirs[key].tolist(), key


def test_prompt_completion_labels_match_trl_completion_only_loss(tmp_path):
    tokenizer = tiny_tokenizer()
    ours = _fimlora_batch(prompt_examples(), tokenizer)
    theirs = _trl_batch(tokenizer, [{"prompt": p, "completion": c} for p, c in PAIRS], tmp_path, completion_only_loss=True)
    _assert_same_batch(ours, theirs)
    first = ours["labels"][0]
    assert first[first != -100].tolist() == tokenizer(" blue</s>", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("template", [MARKED_TEMPLATE, PLAIN_TEMPLATE], ids=["generation-markers", "prefix"])
def test_chat_labels_match_trl_assistant_only_loss(template, tmp_path):
    """TRL needs {% generation %} markers; a template without them (rendering the same text)
    gives the same labels through prefix-by-prefix renderings."""
    ours = _fimlora_batch(TextExamples(["" for _ in CHATS], messages=CHATS), tiny_tokenizer(template))
    theirs = _trl_batch(tiny_tokenizer(MARKED_TEMPLATE), [{"messages": chat} for chat in CHATS], tmp_path,
                        assistant_only_loss=True)
    _assert_same_batch(ours, theirs)


def test_chat_mask_sources_agree():
    marked, plain = tiny_tokenizer(MARKED_TEMPLATE), tiny_tokenizer(PLAIN_TEMPLATE)
    assert (mask_source(marked), mask_source(plain)) == ("generation", "prefix")
    for chat in CHATS:
        ids, mask = encode_chat(marked, chat)
        assert encode_chat(marked, chat, "prefix") == encode_chat(plain, chat) == (ids, mask)
        assert tiny_tokenizer(MARKED_TEMPLATE).decode([i for i, m in zip(ids, mask, strict=True) if m]).split()[-1] == "<|end|>"
    with pytest.raises(ValueError, match="has no chat template, so a messages column cannot be rendered"):
        encode_examples(TextExamples(["x"], messages=[CHATS[0]]), tiny_tokenizer(None), task="causal-lm", max_length=8)


def test_truncation_keeps_the_first_tokens_and_counts_examples_without_loss():
    tokenizer = tiny_tokenizer()
    examples = TextExamples(["question : what colour is the sky ? answer :", "hi"], completions=[" blue", " hello"])
    with pytest.warns(UserWarning, match="1 of 2 examples have no completion token within 5 tokens: .* skips them"):
        features = encode_examples(examples, tokenizer, task="causal-lm", max_length=5)
    assert [f["input_ids"].numel() for f in features] == [5, 4]
    assert features[0]["input_ids"].tolist() == tokenizer(examples.texts[0])["input_ids"][:5]
    assert (features[0]["labels"] == -100).all() and features[1]["labels"].tolist() == [-100, -100] + features[1]["input_ids"][2:].tolist()
    with pytest.raises(ValueError, match="none of the 1 examples has a completion token within 3 tokens"):
        encode_examples(examples.select([0]), tokenizer, task="causal-lm", max_length=3)


def test_masked_layouts_are_for_causal_lm_only():
    with pytest.raises(ValueError, match=r"prompt/completion examples are for task 'causal-lm' .* not 'seq-cls'"):
        encode_examples(prompt_examples(), tiny_tokenizer(), task="seq-cls", max_length=16)
    with pytest.raises(ValueError, match=r"chat \(messages\) examples are for task 'causal-lm'"):
        encode_examples(TextExamples(["x"], messages=[CHATS[0]]), tiny_tokenizer(), task="seq2seq-lm", max_length=16)


# ---------------------------------------------------------------- per-sample losses and calibration


def _features(layout: str):
    tokenizer = tiny_tokenizer(PLAIN_TEMPLATE)
    examples = prompt_examples() if layout == "prompt-completion" else TextExamples(["" for _ in CHATS], messages=CHATS)
    return encode_examples(examples, tokenizer, task="causal-lm", max_length=64), tokenizer.pad_token_id


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("layout", ["prompt-completion", "chat"])
def test_per_sample_loss_is_transformers_loss_on_each_sample_alone(layout, side):
    """loss_n from a padded batch = transformers' own causal-LM loss on sample n alone with the
    masked labels (mean cross-entropy over its completion / assistant tokens)."""
    model = tiny_llama().double()
    features, pad = _features(layout)
    batch = make_batches(features, batch_size=len(features), pad_token_id=pad, padding_side=side)[0]
    layout_ = sample_layout(batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses, valid = causal_lm_losses(logits, batch["labels"], layout_.index, layout_.num_samples)
        expected = torch.stack([model(input_ids=f["input_ids"][None], labels=f["labels"][None]).loss for f in features])
    assert valid.all()
    # transformers casts the logits to float32 for its loss (ForCausalLMLoss), hence float32's tolerance
    torch.testing.assert_close(losses, expected.double(), rtol=1e-6, atol=1e-7)
    # and it is not the loss over every token: the prompt is left out
    with torch.no_grad():
        whole = model(input_ids=features[0]["input_ids"][None], labels=features[0]["input_ids"][None]).loss
    assert abs(float(whole) - float(expected[0])) > 1e-3


def _masked_per_sample_loss(model, input_ids, label, task):
    """oracle.per_sample_loss with the SFT loss: for task "causal-lm-masked" the label is the
    sample's labels (-100 on the prompt); the mean cross-entropy over its labelled targets."""
    if task != "causal-lm-masked":
        return _ORIGINAL_PER_SAMPLE_LOSS(model, input_ids, label, task)
    logits = model(input_ids=input_ids[None], use_cache=False).logits[0]
    return F.cross_entropy(logits[:-1], label[1:], ignore_index=-100)


_ORIGINAL_PER_SAMPLE_LOSS = oracle.per_sample_loss


@pytest.mark.parametrize(("layout", "side"), [("prompt-completion", "right"), ("prompt-completion", "left"),
                                              ("chat", "right")])
def test_calibration_matches_float64_oracle_on_completion_tokens(monkeypatch, layout, side):
    model = tiny_llama()
    features, pad = _features(layout)
    batches = make_batches(features, batch_size=2, pad_token_id=pad, padding_side=side)
    result = fimlora.calibrate(model, batches, rank=RANK, alpha=ALPHA, num_batches=len(batches), progress=False)
    monkeypatch.setattr(oracle, "per_sample_loss", _masked_per_sample_loss)
    samples = [(f["input_ids"], f["labels"]) for f in features]
    grads = oracle_grads(model, samples, list(result.stats), rank=RANK, alpha=ALPHA, task="causal-lm-masked")
    unmasked = oracle_grads(model, samples, list(result.stats), rank=RANK, alpha=ALPHA, task="causal-lm")
    for name, g in grads.items():
        stats, expected = result.stats[name], moments(g)
        assert stats.count == len(features), name
        for key, actual in (("mean", stats.mean), ("variance", stats.variance()), ("fisher", stats.fisher())):
            error = relative_error(actual, expected[key])
            assert error < TOL, f"{name} {key}: relative error {error!r}"
        # the masked loss is what is measured: the all-token loss gives other statistics
        assert relative_error(stats.mean, moments(unmasked[name])["mean"]) > 1e-2, name

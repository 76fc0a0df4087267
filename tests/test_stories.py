"""The stories260K loader reproduces the model's documented greedy sample (conversion check)."""

from __future__ import annotations

import pytest
import torch
from conftest import require
from stories import STORIES_DIR, TOKENIZER_FILE, load_stories260k, load_stories_tokenizer, stories_available


@pytest.fixture(scope="module", autouse=True)
def _needs_stories():
    require(stories_available(), "../shared/models/stories260K not present")

# llama2.c's doc/stories260K.md: greedy decoding from BOS.
DOCUMENTED_SAMPLE = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="module")
def model():
    return load_stories260k(STORIES_DIR)


@pytest.fixture(scope="module")
def tokenizer():
    return load_stories_tokenizer(STORIES_DIR)


def test_config_matches_header(model):
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 172, 5)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (8, 4, 512)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 260_032  # the README layout, tied classifier once


def test_greedy_sample_from_bos(model, tokenizer):
    # Plain argmax loop over the whole prefix: no cache or generation config in the way.
    ids = torch.tensor([[1]])
    with torch.no_grad():
        for _ in range(32):
            next_id = model(ids).logits[:, -1].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    text = tokenizer.decode(ids[0], skip_special_tokens=True)
    assert text.startswith("Once upon a time, there was a little girl named Lily."), text
    assert DOCUMENTED_SAMPLE.startswith(text[: len(DOCUMENTED_SAMPLE)]), text


def test_tokenizer_matches_sentencepiece(tokenizer):
    sentencepiece = pytest.importorskip("sentencepiece")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(STORIES_DIR / TOKENIZER_FILE))
    texts = [
        "Once upon a time, there was a little girl named Lily.",
        '  Tom said, "Look!"   The dog ran\tfast.\nThe end. ',
        "Zoë ate 12 apples 🍎",
        "",
    ]
    for text in texts:
        assert tokenizer(text)["input_ids"] == [1] + processor.encode(text), text
    batch = tokenizer(["a cat", "the big red ball"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()

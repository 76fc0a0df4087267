"""Tiny models built from configs (offline, seeded) and batches for them."""

from __future__ import annotations

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 96


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    config = LlamaConfig(**{**settings, **overrides})
    return LlamaForCausalLM(config).eval()


def reused_layer_llama(seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama whose three decoder positions all run one and the same layer (weight sharing)."""
    model = tiny_llama(seed, num_hidden_layers=3)
    for index in (1, 2):
        model.model.layers[index] = model.model.layers[0]
    return model


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2's linears are transformers' Conv1D, whose weight is stored (d_in, d_out)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, num_labels=num_labels, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    return BertForSequenceClassification(config).eval()


def random_samples(n: int, *, seed: int = 0, min_len: int = 3, max_len: int = 12, num_labels: int = 3):
    """[(input_ids, label)] with varied lengths (ids avoid the pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        out.append((torch.randint(1, VOCAB, (length,), generator=g), torch.randint(0, num_labels, (), generator=g)))
    return out


def pad_batch(samples, *, side: str = "right", causal: bool = True) -> dict[str, torch.Tensor]:
    length = max(len(ids) for ids, _ in samples)
    input_ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, (ids, _) in enumerate(samples):
        cols = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[i, cols] = ids
        mask[i, cols] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if causal:
        batch["labels"] = input_ids.masked_fill(mask == 0, -100)
    else:
        batch["labels"] = torch.stack([label for _, label in samples])
    return batch


def batches_of(samples, size: int, **kwargs) -> list[dict[str, torch.Tensor]]:
    return [pad_batch(samples[i : i + size], **kwargs) for i in range(0, len(samples), size)]


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_ff=48, num_layers=2, num_heads=4, d_kv=8, pad_token_id=0,
                      decoder_start_token_id=0, dropout_rate=0.0)
    return T5ForConditionalGeneration(config).eval()


def tiny_bart(seed: int = 0) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    config = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, dropout=0.0,
                        attention_dropout=0.0, activation_dropout=0.0)
    return BartForConditionalGeneration(config).eval()


def seq2seq_samples(n: int, *, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(source ids, target ids)] with varied lengths on both sides (ids avoid 0-2)."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda low, high: torch.randint(3, VOCAB, (int(torch.randint(low, high, (1,), generator=g)),), generator=g)  # noqa: E731
    return [(draw(3, 10), draw(2, 8)) for _ in range(n)]


def seq2seq_batches(samples, size: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded sources (attention_mask) and targets (labels, -100 where padded)."""
    batches = []
    for i in range(0, len(samples), size):
        chunk = samples[i : i + size]
        source_length, target_length = max(len(s) for s, _ in chunk), max(len(t) for _, t in chunk)
        ids = torch.zeros(len(chunk), source_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full((len(chunk), target_length), -100)
        for row, (source, target) in enumerate(chunk):
            ids[row, : len(source)], mask[row, : len(source)], labels[row, : len(target)] = source, 1, target
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches

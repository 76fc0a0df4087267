"""Load Karpathy's stories260K (llama2.c legacy export) as a transformers LlamaForCausalLM.

A real, pretrained, CPU-fast causal LM for offline tests. The file layout and the mapping to
Hugging Face names are documented in ../shared/models/stories260K/README.md.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import torch

STORIES_DIR = Path(
    os.environ.get(
        "FIMLORA_STORIES_DIR",
        Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K",
    )
)
WEIGHTS_FILE = "stories260K.bin"
TOKENIZER_FILE = "tok512.model"
_HEADER = struct.Struct("<7i")  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len


def stories_available(directory: Path = STORIES_DIR) -> bool:
    """Whether both the weights and the tokenizer are present."""
    return (directory / WEIGHTS_FILE).is_file() and (directory / TOKENIZER_FILE).is_file()


def _rotary_to_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows 0,2,4,..,1,3,5,..: llama2.c rotates interleaved pairs, HF rotates halves."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return weight.view(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def load_stories260k(directory: Path = STORIES_DIR):
    """The checkpoint as a float32 `LlamaForCausalLM` in eval mode, classifier tied to the embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    data = (Path(directory) / WEIGHTS_FILE).read_bytes()
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = _HEADER.unpack_from(data)
    tied = vocab_size > 0  # llama2.c marks an untied classifier with a negative vocab size
    vocab_size = abs(vocab_size)
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim
    payload = torch.frombuffer(bytearray(data[_HEADER.size :]), dtype=torch.float32)

    offset = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal offset
        count = 1
        for size in shape:
            count *= size
        if offset + count > payload.numel():
            raise ValueError(f"{WEIGHTS_FILE} is truncated: the header promises more weights than it holds")
        tensor = payload[offset : offset + count].view(shape).clone()
        offset += count
        return tensor

    # The order of the payload (README): everything per layer is stacked over the layers.
    embedding = take(vocab_size, dim)
    attn_norm = take(n_layers, dim)
    wq, wk = take(n_layers, dim, dim), take(n_layers, kv_dim, dim)
    wv, wo = take(n_layers, kv_dim, dim), take(n_layers, dim, dim)
    ffn_norm = take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden_dim, dim), take(n_layers, dim, hidden_dim), take(n_layers, hidden_dim, dim)
    final_norm = take(dim)
    take(seq_len, head_dim // 2)  # RoPE cos table: HF computes its own
    take(seq_len, head_dim // 2)  # RoPE sin table
    classifier = embedding if tied else take(vocab_size, dim)

    config = LlamaConfig(
        hidden_size=dim,
        intermediate_size=hidden_dim,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).float()
    state = {"model.embed_tokens.weight": embedding, "model.norm.weight": final_norm, "lm_head.weight": classifier}
    for i in range(n_layers):
        prefix = f"model.layers.{i}."
        state |= {
            prefix + "input_layernorm.weight": attn_norm[i],
            prefix + "self_attn.q_proj.weight": _rotary_to_halves(wq[i], n_heads),
            prefix + "self_attn.k_proj.weight": _rotary_to_halves(wk[i], n_kv_heads),
            prefix + "self_attn.v_proj.weight": wv[i],
            prefix + "self_attn.o_proj.weight": wo[i],
            prefix + "post_attention_layernorm.weight": ffn_norm[i],
            prefix + "mlp.gate_proj.weight": w1[i],
            prefix + "mlp.down_proj.weight": w2[i],
            prefix + "mlp.up_proj.weight": w3[i],
        }
    # strict=True: every HF parameter must come from the file (the rotary buffers are not in state_dict).
    model.load_state_dict(state, strict=True)
    if tied:
        model.tie_weights()
    return model.eval()


def load_stories_tokenizer(directory: Path = STORIES_DIR):
    """The 512-piece SentencePiece tokenizer as a `LlamaTokenizer`, padding with <unk> (id 0).

    transformers 5 converts .model files through protobuf, which the dev extras do not require,
    so the BPE vocabulary and merges are read with `sentencepiece` itself. The normaliser copies
    SentencePiece's handling of spaces for this model: runs of spaces collapse, leading and
    trailing spaces go, and a dummy "▁" prefix is added (matches `sp.encode` exactly).
    """
    import sentencepiece
    from tokenizers import Regex, normalizers
    from transformers import LlamaTokenizer

    processor = sentencepiece.SentencePieceProcessor(model_file=str(Path(directory) / TOKENIZER_FILE))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    # SentencePiece BPE merges the pair whose result has the best score (= lowest id here).
    merges = []
    for piece, piece_id in vocab.items():
        if processor.is_byte(piece_id) or processor.is_control(piece_id) or processor.is_unknown(piece_id):
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(splits, key=lambda pair: (len(pair[0]), len(pair[1]), vocab[pair[0]], vocab[pair[1]]))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(Regex(" {2,}"), " "),
            normalizers.Replace(Regex(r"\A | \z"), ""),
            normalizers.Prepend("▁"),
            normalizers.Replace(" ", "▁"),
        ]
    )
    tokenizer.backend_tokenizer.pre_tokenizer = None
    # No pad token is defined; <unk> never appears in byte-fallback output, so it is a safe pad.
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.model_max_length = 512
    return tokenizer

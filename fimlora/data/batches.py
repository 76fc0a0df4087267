"""Batches: pad encoded examples into batches (`collate`, `make_batches`), and the id to pad with."""

from __future__ import annotations

from typing import Any

import torch


def collate(features: list[dict], *, pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad 1-D features into one batch: input_ids with pad_token_id, masks and type ids with 0,
    per-token labels with -100 (ignored by the loss) to the longest labels (a seq2seq target can
    be longer or shorter than its source); scalar labels are stacked."""
    if not features:
        raise ValueError("collate needs at least one feature")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(feature["input_ids"].numel() for feature in features)
    batch = {}
    for key in features[0]:
        values = [feature[key] for feature in features]
        if key == "labels" and values[0].dim() == 0:
            batch[key] = torch.stack(values)
            continue
        if key == "labels":
            if any(value.dim() != 1 for value in values):
                raise ValueError("collate: per-token labels must be 1-D")
            size = max(value.numel() for value in values)
        elif any(value.shape != feature["input_ids"].shape for value, feature in zip(values, features, strict=True)):
            raise ValueError(f"collate: every {key!r} must be 1-D and as long as its input_ids")
        else:
            size = length
        fill = pad_token_id if key == "input_ids" else -100 if key == "labels" else 0
        paddings = [value.new_full((size - value.numel(),), fill) for value in values]
        pieces = zip(paddings, values, strict=True) if padding_side == "left" else zip(values, paddings, strict=True)
        batch[key] = torch.stack([torch.cat(pair) for pair in pieces])
    return batch


def make_batches(
    features: list[dict],
    *,
    batch_size: int,
    pad_token_id: int,
    padding_side: str = "right",
    num_batches: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Padded batches of `batch_size` (the last may be smaller), shuffled by `seed` if asked, at most `num_batches`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    if not features:
        raise ValueError("make_batches got no features")
    order = list(range(len(features)))
    if shuffle:
        # A private generator: the same seed gives the same batches without touching global RNG state.
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed)).tolist()
    # Fewer batches than num_batches is not an error here: calibrate() warns about a short supply.
    starts = range(0, len(features), batch_size)[:num_batches]
    chunks = ([features[i] for i in order[start : start + batch_size]] for start in starts)
    return [collate(chunk, pad_token_id=pad_token_id, padding_side=padding_side) for chunk in chunks]


def pad_token_id_for(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token, else 0."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0

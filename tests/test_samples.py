"""Which tokens form each sample: padded rows, packed rows, cu_seq_lens."""

from __future__ import annotations

import pytest
import torch

from fimlora.samples import sample_layout


def test_left_and_right_padding_and_an_empty_row():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    layout = sample_layout({"input_ids": mask, "attention_mask": mask})
    assert not layout.packed
    assert layout.segments.tolist() == [[0, 3], [5, 8], [8, 8]]  # the empty row is an empty sample
    assert layout.index.tolist() == [[0, 0, 0, -1], [-1, 1, 1, 1], [-1, -1, -1, -1]]


@pytest.mark.parametrize(
    "packing",
    [
        {"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])},
        {"cu_seq_lens": torch.tensor([0, 3, 5, 8])},
    ],
)
def test_packed_row(packing):
    layout = sample_layout({"input_ids": torch.ones(1, 8, dtype=torch.long), **packing})
    assert layout.packed
    assert layout.segments.tolist() == [[0, 3], [3, 5], [5, 8]]
    assert layout.index.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]


def test_plain_position_ids_are_not_packing():
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "position_ids": torch.arange(4).expand(2, 4)}
    assert sample_layout(batch).segments.tolist() == [[0, 4], [4, 8]]


def test_gap_in_a_padded_row_is_rejected_with_the_fix():
    mask = torch.tensor([[1, 0, 1, 1]])
    with pytest.raises(ValueError, match="contiguous.*position_ids that restart"):
        sample_layout({"input_ids": mask, "attention_mask": mask})

"""The accumulate op's benchmark inputs, shared by op_throughput.py and tune_triton.py: seeded dy
and h of N samples of L tokens, the bytes the op must read, and the device's copy bandwidth."""

from __future__ import annotations

import torch
from _common import time_interleaved

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def copy_bandwidth(device: str) -> float:
    """Measured GB/s of a large device-to-device copy (read + write). 1 GiB, so that the copy
    lasts far longer than a launch and no cache holds it."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_interleaved({"copy": lambda: dst.copy_(src)}, device=device, repeats=10)["copy"]
    return 2 * src.numel() / seconds / 1e9


def make_inputs(n: int, length: int, d_out: int, r: int, dtype: torch.dtype, device: str):
    """dy (N*L, d_out), h (N*L, r) and one full-row segment per sample, seeded."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dy = torch.randn(n * length, d_out, generator=g).to(device=device, dtype=dtype)
    h = torch.randn(n * length, r, generator=g).to(device=device, dtype=dtype)
    starts = torch.arange(n) * length
    return dy, h, torch.stack([starts, starts + length], dim=1).to(device)


def read_bytes(dy: torch.Tensor, h: torch.Tensor) -> int:
    """The bytes the op must read: dy and h once."""
    return dy.numel() * dy.element_size() + h.numel() * h.element_size()

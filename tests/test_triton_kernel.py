"""The fused Triton accumulate kernel against a plain float64 per-sample loop.

On CPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), which is
slow per program, so every shape here is tiny. Block sizes are forced small where a test needs
several d/r tiles or token chunks.
"""

from __future__ import annotations

import pytest
import torch
from oracle import assert_stats, moments, op_oracle, relative_error

from fimlora import backends
from fimlora.backends import _triton
from fimlora.stats import LayerStats

pytestmark = pytest.mark.gpu if torch.cuda.is_available() else pytest.mark.interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Normwise relative tolerances. The oracle sees the same (already rounded) input values in
# float64, so the products are exact in every dtype and only fp32 accumulation order differs;
# 2-byte inputs get headroom for tensor-core accumulation on a GPU.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


@pytest.fixture(scope="module")
def kernel():
    ok, reason = _triton.available()
    if not ok:
        pytest.skip(reason)
    from fimlora._kernels.accumulate import accumulate_sample_stats

    return accumulate_sample_stats


# ---------------------------------------------------------------------------------------------
# inputs

# Unsorted, non-overlapping, with gaps (padding at 4..5, 20..21, 46..47): an empty sample,
# a single-token sample and a few longer ones.
SEGMENTS = [[22, 33], [0, 4], [6, 6], [33, 34], [6, 20], [34, 46]]
T = 48


def make_inputs(d_out: int, r: int, dtype: torch.dtype, h_dtype: torch.dtype | None = None, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    dy = torch.randn(T, d_out, generator=generator).to(dtype)
    h = torch.randn(T, r, generator=generator).to(h_dtype or dtype)
    segments = torch.tensor(SEGMENTS, dtype=torch.int64)
    return dy.to(DEVICE), h.to(DEVICE), segments.to(DEVICE)


def run(kernel, dy, h, segments, scale, *, count=0, mean=None, m2=None, state_dtype=torch.float32, norms=None,
        **kwargs):
    """The kernel on a fresh (or the given) state; the LayerStats it leaves. With ``norms`` (the
    default on a fresh state) the kernel also writes each sample's squared norm, and the state
    keeps them, so that assert_stats checks them against the oracle too."""
    shape = (dy.shape[1], h.shape[1])
    mean = torch.zeros(shape, dtype=state_dtype, device=DEVICE) if mean is None else mean
    m2 = torch.zeros(shape, dtype=state_dtype, device=DEVICE) if m2 is None else m2
    norms = count == 0 if norms is None else norms
    sample_sq = torch.full((segments.shape[0],), float("nan"), device=DEVICE) if norms else None  # all written
    kernel(dy, h, segments, scale, count, mean, m2, sample_sq=sample_sq, **kwargs)
    state = LayerStats(count + segments.shape[0], mean, m2, track_samples=norms)
    if norms:
        state.set_sample_sq_(sample_sq)
    return state


# ---------------------------------------------------------------------------------------------
# correctness


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [1, 3, 16, 40])
def test_matches_float64_oracle(kernel, dtype, r):
    # d_out = 37 is no multiple of the block; block_r = 16 puts r = 40 on three r-tiles;
    # block_t = 16 splits the longer samples into several token chunks.
    dy, h, segments = make_inputs(37, r, dtype)
    actual = run(kernel, dy, h, segments, 0.75, block_d=16, block_r=16, block_t=16)
    assert_stats(actual, op_oracle(dy, h, segments, 0.75), TOLERANCE[dtype])


def test_default_blocks_and_mixed_input_dtypes(kernel):
    dy, h, segments = make_inputs(20, 5, torch.bfloat16, h_dtype=torch.float32)
    actual = run(kernel, dy, h, segments, 2.0)
    assert_stats(actual, op_oracle(dy, h, segments, 2.0), TOLERANCE[torch.bfloat16])


def test_empty_and_single_token_samples(kernel):
    dy, h, _ = make_inputs(18, 3, torch.float32)
    segments = torch.tensor([[5, 5], [9, 10], [0, 0], [40, 41]], device=DEVICE)
    grads = op_oracle(dy, h, segments, 1.0)
    assert grads[0].abs().max() == 0 and grads[2].abs().max() == 0
    assert_stats(run(kernel, dy, h, segments, 1.0), grads, TOLERANCE[torch.float32])


def test_long_segment_spans_many_token_chunks(kernel):
    generator = torch.Generator().manual_seed(1)
    dy = torch.randn(64, 17, generator=generator).to(DEVICE)
    h = torch.randn(64, 2, generator=generator).to(DEVICE)
    segments = torch.tensor([[1, 63], [63, 64], [0, 1]], device=DEVICE)  # 62 tokens = 4 chunks of 16
    actual = run(kernel, dy, h, segments, 0.5, block_t=16, num_splits=1)
    assert_stats(actual, op_oracle(dy, h, segments, 0.5), TOLERANCE[torch.float32])


def test_padding_tokens_are_ignored(kernel):
    dy, h, segments = make_inputs(12, 4, torch.float32)
    poisoned = dy.clone()
    poisoned[[4, 5, 20, 21, 46, 47]] = float("nan")  # tokens in no segment
    expected = run(kernel, dy, h, segments, 1.0)
    assert_stats(run(kernel, poisoned, h, segments, 1.0), expected, 0.0)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
def test_one_split_and_three_splits_agree(kernel, state_dtype):
    dy, h, segments = make_inputs(24, 6, torch.float32, seed=3)
    one = run(kernel, dy, h, segments, 1.5, num_splits=1, state_dtype=state_dtype)
    three = run(kernel, dy, h, segments, 1.5, num_splits=3, state_dtype=state_dtype)
    assert_stats(three, one, 1e-6)
    assert_stats(three, op_oracle(dy, h, segments, 1.5), TOLERANCE[torch.float32])


def test_more_splits_than_samples(kernel):
    dy, h, _ = make_inputs(10, 2, torch.float32)
    segments = torch.tensor([[3, 9], [11, 30]], device=DEVICE)
    actual = run(kernel, dy, h, segments, 1.0, num_splits=8)
    assert_stats(actual, op_oracle(dy, h, segments, 1.0), TOLERANCE[torch.float32])


@pytest.mark.parametrize("num_splits", [1, 2])
def test_existing_state_is_merged(kernel, num_splits):
    dy, h, segments = make_inputs(9, 5, torch.float32)
    generator = torch.Generator().manual_seed(7)
    previous = 3.0 + torch.randn(4, 9, 5, generator=generator, dtype=torch.float64)  # non-zero mean
    mean = previous.mean(dim=0).float().to(DEVICE)
    m2 = (previous.var(dim=0, unbiased=False) * 4).float().to(DEVICE)
    actual = run(kernel, dy, h, segments, 0.25, count=4, mean=mean, m2=m2, num_splits=num_splits)
    grads = torch.cat([previous, op_oracle(dy, h, segments, 0.25)])
    assert_stats(actual, grads, TOLERANCE[torch.float32])


@pytest.mark.parametrize("num_splits", [1, 3])
def test_state_is_updated_in_place(kernel, num_splits):
    dy, h, segments = make_inputs(8, 3, torch.float32)
    state = LayerStats.zeros(8, 3, device=DEVICE)
    pointers = (state.mean.data_ptr(), state.m2.data_ptr())
    kernel(dy, h, segments, 1.0, 0, state.mean, state.m2, num_splits=num_splits)
    assert (state.mean.data_ptr(), state.m2.data_ptr()) == pointers
    assert state.m2.abs().max() > 0


def test_many_small_calls_equal_one_large_call(kernel):
    dy, h, segments = make_inputs(11, 4, torch.float32, seed=5)
    once = LayerStats.zeros(11, 4, device=DEVICE)
    _triton.accumulate(dy, h, segments, 0.5, once)
    pieces = LayerStats.zeros(11, 4, device=DEVICE)
    for part in (segments[:1], segments[1:4], segments[4:]):
        _triton.accumulate(dy, h, part, 0.5, pieces)
    assert once.count == pieces.count == len(SEGMENTS)
    assert_stats(pieces, once, 1e-6)
    assert_stats(pieces, op_oracle(dy, h, segments, 0.5), TOLERANCE[torch.float32])


def test_variance_is_stable_when_mean_dominates(kernel):
    # One token per sample and h = 1: G_n = dy_n exactly, with |mean| = 1e4 * std. A sum of squares
    # in fp32 would lose every digit of the variance (1e8 - 1e8); Welford/Chan keep about three.
    generator = torch.Generator().manual_seed(11)
    n, d_out = 24, 6
    dy = (1e4 + torch.randn(n, d_out, generator=generator, dtype=torch.float64)).float().to(DEVICE)
    h = torch.ones(n, 1, device=DEVICE)
    segments = torch.stack([torch.arange(n), torch.arange(1, n + 1)], dim=1).to(DEVICE)
    expected = moments(op_oracle(dy, h, segments, 1.0))["variance"]
    for num_splits in (1, 3):
        state = LayerStats.zeros(d_out, 1, device=DEVICE)
        for part in (segments[:10], segments[10:]):  # also through the state merge
            kernel(dy, h, part, 1.0, state.count, state.mean, state.m2, num_splits=num_splits)
            state.count += part.shape[0]
        error = relative_error(state.variance(), expected)
        assert error < 1e-2, f"num_splits={num_splits}: variance relative error {error!r}"


def test_strided_inputs(kernel):
    generator = torch.Generator().manual_seed(2)
    wide = torch.randn(T, 30, generator=generator).to(DEVICE)
    dy = wide[:, 5:20]  # leading stride 30, inner stride 1: used as is
    h = torch.randn(3, T, generator=generator).to(DEVICE).T  # inner stride T: copied
    table = torch.tensor([[a, b, -1] for a, b in SEGMENTS], device=DEVICE)
    segments = table[:, :2]  # row stride 3
    actual = run(kernel, dy, h, segments, 1.0)
    assert_stats(actual, op_oracle(dy, h, segments, 1.0), TOLERANCE[torch.float32])


def test_no_tokens_at_all(kernel):
    # T = 0: every sample is empty, so each contributes a zero gradient to the state.
    dy, h = torch.zeros(0, 5, device=DEVICE), torch.zeros(0, 3, device=DEVICE)
    mean, m2 = torch.ones(5, 3, device=DEVICE), torch.ones(5, 3, device=DEVICE)
    kernel(dy, h, torch.zeros(2, 2, dtype=torch.int64, device=DEVICE), 1.0, 2, mean, m2)
    # prior state: 2 gradients with mean 1 and M2 1; two zero gradients join it: mean 0.5, M2 = 1 + 1 = 2
    assert torch.allclose(mean, torch.full_like(mean, 0.5)) and torch.allclose(m2, torch.full_like(m2, 2.0))


@pytest.mark.parametrize("blocks", [{}, {"block_d": 16, "block_r": 16, "num_splits": 3}], ids=["one-tile", "tiles"])
def test_norms_leave_the_moments_bit_identical(kernel, blocks):
    """With one tile the kernel writes the norms itself, with several a workspace is summed;
    either way the moments are exactly those of a call without norms."""
    dy, h, segments = make_inputs(20, 18, torch.float32, seed=5)
    with_norms = run(kernel, dy, h, segments, 0.5, **blocks)
    without = run(kernel, dy, h, segments, 0.5, norms=False, **blocks)
    assert torch.equal(with_norms.mean, without.mean) and torch.equal(with_norms.m2, without.m2)
    assert_stats(with_norms, op_oracle(dy, h, segments, 0.5), TOLERANCE[torch.float32])


def test_norms_of_a_state_without_elements_are_zero(kernel):
    dy, h, segments = make_inputs(0, 3, torch.float32)
    sample_sq = torch.full((len(SEGMENTS),), 5.0, device=DEVICE)
    kernel(dy, h, segments, 1.0, 0, torch.zeros(0, 3, device=DEVICE), torch.zeros(0, 3, device=DEVICE), sample_sq=sample_sq)
    assert not sample_sq.any()


def test_no_samples_leave_the_state_alone(kernel):
    dy, h, _ = make_inputs(5, 2, torch.float32)
    mean, m2 = torch.ones(5, 2, device=DEVICE), torch.ones(5, 2, device=DEVICE)
    kernel(dy, h, torch.empty(0, 2, dtype=torch.int64, device=DEVICE), 1.0, 3, mean, m2)
    assert bool((mean == 1).all() and (m2 == 1).all())


# ---------------------------------------------------------------------------------------------
# validation and the backend module


def _bad_calls():
    def zeros(*shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype, device=DEVICE)

    segments = torch.tensor([[0, 2]], device=DEVICE)
    good = {
        "dy": zeros(4, 3),
        "h": zeros(4, 2),
        "segments": segments,
        "scale": 1.0,
        "count": 0,
        "mean": zeros(3, 2),
        "m2": zeros(3, 2),
    }
    cases = {
        "dy 3-D": ({"dy": zeros(4, 3, 1)}, "dy"),
        "dy int": ({"dy": zeros(4, 3, dtype=torch.int32)}, "dy"),
        "h fp64": ({"h": zeros(4, 2, dtype=torch.float64)}, "h"),
        "T mismatch": ({"h": zeros(5, 2)}, "tokens"),
        "mean shape": ({"mean": zeros(2, 3)}, "mean"),
        "m2 dtype": ({"m2": zeros(3, 2, dtype=torch.float16)}, "m2"),
        "segments shape": ({"segments": segments.T}, "segments"),
        "segments dtype": ({"segments": segments.int()}, "segments"),
        "segment past T": ({"segments": torch.tensor([[2, 5]], device=DEVICE)}, "segments"),
        "segment reversed": ({"segments": torch.tensor([[3, 1]], device=DEVICE)}, "segments"),
        "count negative": ({"count": -1}, "count"),
        "block_r not pow2": ({"block_r": 24}, "block_r"),
        "block_t too small": ({"block_t": 8}, "block_t"),
        "num_splits zero": ({"num_splits": 0}, "num_splits"),
        "num_warps 3": ({"num_warps": 3}, "num_warps"),
        "sample_sq fp64": ({"sample_sq": zeros(1, dtype=torch.float64)}, "sample_sq must be float32"),
        "sample_sq shape": ({"sample_sq": zeros(2)}, r"sample_sq must have shape \(S,\) = \(1,\)"),
        "sample_sq aliases m2": ({"m2": zeros(3, 2), "sample_sq": None}, "sample_sq must not share memory"),
    }
    return good, cases


@pytest.mark.parametrize("case", list(_bad_calls()[1]))
def test_input_validation(kernel, case):
    good, cases = _bad_calls()
    change, word = cases[case]
    arguments = {**good, **change}
    blocks = {key: arguments.pop(key) for key in ("block_r", "block_t", "num_splits", "num_warps", "sample_sq")
              if key in arguments}
    if case == "sample_sq aliases m2":
        blocks["sample_sq"] = arguments["m2"].view(-1)[:1]
    with pytest.raises(ValueError, match=word):
        kernel(*arguments.values(), **blocks)


def test_backend_module(kernel):
    ok, reason = _triton.available()
    assert ok and isinstance(reason, str)
    assert _triton.name == "triton"
    dy, h, segments = make_inputs(6, 2, torch.float32)
    state = LayerStats.zeros(6, 2, device=DEVICE)
    backends.accumulate(dy, h, segments.cpu(), 1.0, state, backend="triton")  # host ranges are moved to dy's device
    assert state.count == len(SEGMENTS)
    assert_stats(state, op_oracle(dy, h, segments, 1.0), 2e-5)


def test_kernels_folder_is_only_fimlora_kernels(tmp_path):
    """DESIGN §4: the repository's kernels/ is installed as fimlora._kernels and never shadows the
    PyPI package named `kernels` (which bitsandbytes and transformers import), neither in a fresh
    process outside the checkout nor in this test process."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    ours = Path(__file__).resolve().parents[1] / "kernels"
    spec = importlib.util.find_spec("kernels")
    assert spec is None or Path(spec.origin or "").parent != ours, (
        f"`kernels` resolves to {spec.origin}: run `pytest` (as `make test` does), not `python -m pytest` "
        "from the checkout's root, which puts the checkout itself on sys.path")
    probe = ("import importlib.util, fimlora._kernels as k; s = importlib.util.find_spec('kernels'); "
             "print(k.__name__, None if s is None else s.origin)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    name, origin = done.stdout.split()
    assert name == "fimlora._kernels" and (origin == "None" or Path(origin).parent != ours), done.stdout

"""The compiled extension fimlora._C: the operator fimlora::accumulate_sample_stats (its CPU
kernel; one gpu-marked test runs the CUDA kernel where it is built) behind the ``compiled``
backend, its soft loader, and the compile check of the torch-free CUDA kernel file.

The oracle is the float64 per-sample loop of tests/oracle.py (op_oracle), stacked after any
earlier gradients. The extension is built by `pip install --no-build-isolation -e .`; where it
is missing the tests skip with the loader's reason (under CI=true they fail instead).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import require
from oracle import assert_stats, op_oracle, relative_error, sample_sq_oracle

from fimlora.backends import _compiled
from fimlora.stats import LayerStats

pytestmark = pytest.mark.ext

KERNEL_CU = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "accumulate_kernel.cu"
# Normwise relative error allowed per state dtype: float32 states see float32 products.
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-11}


@pytest.fixture
def op():
    ok, reason = _compiled.load()
    require(ok, f"fimlora._C is not usable: {reason}")
    return torch.ops.fimlora.accumulate_sample_stats


def oracle(dy, h, segments, scale, previous=None):
    """Per-sample float64 gradients: the earlier ones `previous` (M, d_out, r), then this batch's."""
    grads = op_oracle(dy, h, segments.cpu(), scale)
    return grads if previous is None else torch.cat([previous.double(), grads])


def state_from(grads: torch.Tensor, dtype: torch.dtype) -> LayerStats:
    """A LayerStats holding the exact moments of `grads`, as earlier calls would have left it."""
    mean = grads.double().mean(dim=0)
    m2 = (grads.double() - mean).square().sum(dim=0)
    return LayerStats(grads.shape[0], mean.to(dtype), m2.to(dtype))


def make_inputs(num_tokens, d_out, r, dy_dtype=torch.float32, h_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(num_tokens, d_out, generator=g).to(dy_dtype)
    h = torch.randn(num_tokens, r, generator=g).to(h_dtype or dy_dtype)
    return dy, h


# Unsorted, with gaps (tokens 1-4 and 41-44 are in no sample), an empty sample twice and a
# single-token one; 50 tokens.
SEGMENTS = [[30, 41], [0, 1], [5, 5], [12, 30], [45, 50], [41, 41], [5, 12]]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("r", [1, 40])
@pytest.mark.parametrize(
    "dy_dtype,h_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),  # dtypes may differ
    ],
)
def test_matches_float64_oracle(op, dy_dtype, h_dtype, r, state_dtype):
    d_out = 67  # a multiple of no block size
    dy, h = make_inputs(50, d_out, r, dy_dtype, h_dtype)
    segments = torch.tensor(SEGMENTS)
    previous = torch.randn(5, d_out, r, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    state = state_from(previous, state_dtype)
    mean_ptr, m2_ptr = state.mean.data_ptr(), state.m2.data_ptr()

    sample_sq = torch.full((len(SEGMENTS),), float("nan"))  # every entry must be written
    _compiled.accumulate(dy, h, segments, 0.25, state, sample_sq)

    assert (state.mean.data_ptr(), state.m2.data_ptr()) == (mean_ptr, m2_ptr)  # updated in place
    assert state.mean.dtype == state.m2.dtype == state_dtype
    # the oracle sees the same rounded inputs: only the arithmetic differs
    assert_stats(state, oracle(dy, h, segments, 0.25, previous), TOLERANCE[state_dtype])
    # the norms are float32 outputs whatever the state's dtype
    error = relative_error(sample_sq, sample_sq_oracle(op_oracle(dy, h, segments, 0.25)))
    assert error <= TOLERANCE[torch.float32], f"per-sample squared norms: {error!r}"


def test_first_call_from_zeros_and_op_returns_nothing(op):
    dy, h = make_inputs(50, 33, 7)
    segments = torch.tensor(SEGMENTS)
    state = LayerStats.zeros(33, 7)
    assert op(dy, h, segments, 2.0, 0, state.mean, state.m2) is None
    state.count += len(SEGMENTS)
    assert_stats(state, oracle(dy, h, segments, 2.0), TOLERANCE[torch.float32])


def test_no_segments_leaves_state_unchanged(op):
    dy, h = make_inputs(8, 5, 3)
    state = state_from(torch.randn(4, 5, 3), torch.float32)
    before = (state.mean.clone(), state.m2.clone())
    _compiled.accumulate(dy, h, torch.zeros(0, 2, dtype=torch.long), 1.0, state)
    assert state.count == 4
    assert torch.equal(state.mean, before[0]) and torch.equal(state.m2, before[1])


def test_only_empty_samples_count_as_zero_gradients(op):
    dy, h = make_inputs(6, 4, 2)
    segments = torch.tensor([[3, 3], [0, 0]])
    state = LayerStats.zeros(4, 2, dtype=torch.float64)
    _compiled.accumulate(dy, h, segments, 1.0, state)
    assert state.count == 2
    assert not state.mean.any() and not state.m2.any()


def test_strided_inputs(op):
    """Transposed and sliced views: the kernel uses the strides, not a contiguous copy."""
    base_dy, base_h = make_inputs(60, 80, 12)
    dy = base_dy.T.contiguous().T[5:55, 3:70]  # column-major (50, 67)
    h = base_h[5:55, ::2]  # every other column (50, 6)
    segments = torch.tensor(SEGMENTS)
    state = LayerStats.zeros(67, 6, dtype=torch.float64)
    _compiled.accumulate(dy, h, segments, 0.5, state)
    assert_stats(state, oracle(dy, h, segments, 0.5), TOLERANCE[torch.float64])


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
def test_many_small_calls_equal_one_big_call(op, state_dtype):
    dy, h = make_inputs(400, 45, 9, seed=3)
    bounds = torch.linspace(0, 400, 41).long()
    segments = torch.stack([bounds[:-1], bounds[1:]], dim=1)  # 40 samples of 10 tokens
    one = LayerStats.zeros(45, 9, dtype=state_dtype)
    _compiled.accumulate(dy, h, segments, 0.1, one)
    many = LayerStats.zeros(45, 9, dtype=state_dtype)
    for chunk in segments.split(3):
        _compiled.accumulate(dy, h, chunk, 0.1, many)
    assert many.count == one.count == 40
    tol = TOLERANCE[state_dtype]
    assert_stats(many, one, tol)
    assert_stats(many, oracle(dy, h, segments, 0.1), tol)


def test_stable_when_mean_dwarfs_spread(op):
    """|mean| = 1e4 x std in a float32 state: a sum of squares would lose every digit of the
    variance (1e8 * 6e-8 = 6 > 1); Welford/Chan keep it to float32 rounding of the inputs."""
    g = torch.Generator().manual_seed(4)
    state = LayerStats.zeros(16, 4)
    everything = []
    for _ in range(20):  # 20 calls of 32 single-token samples: G_n = dy_n^T * 1
        dy = 1e4 + torch.randn(32, 16, generator=g)
        h = torch.ones(32, 4)
        segments = torch.stack([torch.arange(32), torch.arange(1, 33)], dim=1)
        _compiled.accumulate(dy, h, segments, 1.0, state)
        everything.append(dy.double()[:, :, None].expand(32, 16, 4))
    grads = torch.cat(everything)
    assert relative_error(state.mean, grads.mean(dim=0)) < 1e-6
    assert relative_error(state.variance(), grads.var(dim=0, unbiased=False)) < 5e-4  # the torch backend: 1e-4


def test_large_layer_spans_several_row_blocks(op):
    """r=64 gives blocks of 1024 rows: d_out=3001 is split over tasks and several blocks each,
    the last one partial."""
    dy, h = make_inputs(96, 3001, 64, seed=5)
    segments = torch.tensor([[0, 40], [40, 41], [50, 96], [41, 41]])
    previous = torch.randn(3, 3001, 64, dtype=torch.float64)
    state = state_from(previous, torch.float64)
    _compiled.accumulate(dy, h, segments, 1.5, state)
    assert_stats(state, oracle(dy, h, segments, 1.5, previous), TOLERANCE[torch.float64])


def test_opcheck(op):
    dy, h = make_inputs(20, 9, 3, torch.bfloat16, torch.float32)
    segments = torch.tensor([[0, 5], [5, 5], [8, 20]])
    mean, m2 = torch.randn(9, 3), torch.rand(9, 3)
    torch.library.opcheck(op.default, (dy, h, segments, 0.5, 4, mean, m2))
    torch.library.opcheck(op.default, (dy, h, segments, 0.5, 4, mean, m2, torch.zeros(3)))


def test_sample_sq_is_deterministic_across_thread_counts(op):
    """Partial sums per group of rows, reduced in a fixed order: the norms do not depend on how
    at::parallel_for splits d_out (1 thread, 2, 3), bit for bit; d_out = 3001 spans many groups."""
    dy, h = make_inputs(96, 3001, 16, seed=6)
    segments = torch.tensor([[0, 40], [40, 41], [50, 96], [41, 41]])
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            state, sample_sq = LayerStats.zeros(3001, 16), torch.empty(4)
            _compiled.accumulate(dy, h, segments, 1.5, state, sample_sq)
            results.append(sample_sq)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], other) for other in results[1:])
    error = relative_error(results[0], sample_sq_oracle(op_oracle(dy, h, segments, 1.5)))
    assert error <= TOLERANCE[torch.float32], f"{error!r}"


def test_sample_sq_of_a_state_without_elements_is_zero(op):
    sample_sq = torch.full((2,), 5.0)
    op(torch.randn(4, 0), torch.randn(4, 3), torch.tensor([[0, 2], [2, 4]]), 1.0, 0, torch.zeros(0, 3),
       torch.zeros(0, 3), sample_sq)
    assert not sample_sq.any()


@pytest.mark.parametrize(
    "sample_sq,message",
    [
        (torch.zeros(2, dtype=torch.float64), "sample_sq must be float32, got Double"),
        (torch.zeros(3), r"sample_sq must have shape \(S,\) = \(2,\)"),
        (torch.zeros(2, 1), r"sample_sq must have shape \(S,\)"),
        (torch.zeros(4)[::2], "sample_sq must be contiguous"),
    ],
)
def test_bad_sample_sq_is_named(op, sample_sq, message):
    with pytest.raises(RuntimeError, match=message):
        op(torch.randn(10, 5), torch.randn(10, 3), torch.tensor([[0, 4], [4, 10]]), 1.0, 0, torch.zeros(5, 3),
           torch.zeros(5, 3), sample_sq)


def test_sample_sq_must_not_alias_the_state(op):
    mean, m2 = torch.zeros(5, 3), torch.zeros(5, 3)
    with pytest.raises(RuntimeError, match="sample_sq must not share memory with mean or m2"):
        op(torch.randn(10, 5), torch.randn(10, 3), torch.tensor([[0, 4], [4, 10]]), 1.0, 0, mean, m2, m2.view(-1)[:2])


@pytest.mark.parametrize(
    "change,message",
    [
        ({"segments": torch.tensor([[0, 2]], dtype=torch.int32)}, "segments must be int64"),
        ({"segments": torch.tensor([0, 2])}, r"segments must have shape \(S, 2\)"),
        ({"segments": torch.tensor([[0, 2], [3, 11]])}, r"segments\[1\] = \[3, 11\) is not a \[start, end\) range within the 10 tokens"),
        ({"segments": torch.tensor([[4, 2]])}, r"segments\[0\] = \[4, 2\) is not a"),
        ({"h": torch.randn(9, 3)}, "dy and h must have the same number of tokens T"),
        ({"dy": torch.randn(10, 5, dtype=torch.float64)}, "dy must be float32, float16 or bfloat16, got Double"),
        ({"h": torch.randn(10, 3).int()}, "h must be float32, float16 or bfloat16"),
        ({"mean": torch.zeros(5, 4)}, r"mean must have shape \(d_out, r\) = \(5, 3\)"),
        ({"m2": torch.zeros(5, 3, dtype=torch.float64)}, "m2 must have the dtype of mean"),
        ({"mean": torch.zeros(5, 3, dtype=torch.float16)}, "mean must be float32 or float64"),
        ({"mean": torch.zeros(3, 5).T}, "mean must be contiguous"),
        ({"count": -1}, "count must be >= 0"),
    ],
)
def test_bad_inputs_name_the_argument(op, change, message):
    args = {
        "dy": torch.randn(10, 5),
        "h": torch.randn(10, 3),
        "segments": torch.tensor([[0, 4], [4, 10]]),
        "scale": 1.0,
        "count": 0,
        "mean": torch.zeros(5, 3),
        "m2": torch.zeros(5, 3),
    }
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        op(**args)


def test_mean_and_m2_must_not_alias(op):
    state = torch.zeros(5, 3)
    with pytest.raises(RuntimeError, match="mean and m2 must not share memory"):
        op(torch.randn(10, 5), torch.randn(10, 3), torch.tensor([[0, 10]]), 1.0, 0, state, state)


def test_backend_contract(op):
    ok, reason = _compiled.available()
    assert ok and "fimlora._C" in reason
    assert _compiled.name == "compiled"
    if not _compiled.has_cuda_kernels():
        ok, reason = _compiled.available("cuda")
        assert not ok and "without CUDA kernels" in reason


@pytest.mark.gpu
def test_cuda_kernel_matches_oracle(op):
    if not (torch.cuda.is_available() and _compiled.has_cuda_kernels()):
        pytest.skip("needs a GPU and fimlora._C built with CUDA kernels")
    for dy_dtype, state_dtype in [(torch.float32, torch.float32), (torch.bfloat16, torch.float64), (torch.float16, torch.float32)]:
        dy, h = make_inputs(50, 67, 40, dy_dtype, torch.float32)
        segments = torch.tensor(SEGMENTS)
        previous = torch.randn(5, 67, 40, dtype=torch.float64)
        state = state_from(previous, state_dtype)
        state = LayerStats(state.count, state.mean.cuda(), state.m2.cuda())
        sample_sq = torch.full((len(SEGMENTS),), float("nan"), device="cuda")
        _compiled.accumulate(dy.cuda(), h.cuda(), segments.cuda(), 0.25, state, sample_sq)
        state = LayerStats(state.count, state.mean.cpu(), state.m2.cpu())
        assert_stats(state, oracle(dy, h, segments, 0.25, previous), 2e-5)
        error = relative_error(sample_sq, sample_sq_oracle(op_oracle(dy, h, segments, 0.25)))
        assert error <= 2e-5, f"{dy_dtype}/{state_dtype} per-sample squared norms: {error!r}"


# --- the loader, without rebuilding --------------------------------------------------------


def test_loader_reports_a_torch_mismatch(monkeypatch, op):
    monkeypatch.setattr(torch, "__version__", "0.0.1+elsewhere")
    ok, reason = _compiled.load.__wrapped__()
    assert not ok
    assert "built for torch" in reason and "running 0.0.1+elsewhere" in reason
    assert "pip install --no-build-isolation -e ." in reason


def test_loader_reports_a_missing_build(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(_compiled.importlib, "import_module", missing)
    ok, reason = _compiled.load.__wrapped__()
    assert not ok and "not built" in reason and "pip install --no-build-isolation -e ." in reason


def test_loader_reports_a_broken_library(monkeypatch):
    def broken(name):
        raise ImportError("fimlora/_C.so: undefined symbol: _ZN3c104cuda9SomethingEv")

    monkeypatch.setattr(_compiled.importlib, "import_module", broken)
    ok, reason = _compiled.load.__wrapped__()
    assert not ok and "undefined symbol" in reason and "--no-build-isolation" in reason


# --- compile check of the torch-free CUDA kernel ------------------------------------------


def test_cuda_kernel_file_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    # The defines mirror the flags torch's CUDAExtension builds with; warnings are errors.
    command = [
        nvcc, "-arch=sm_90", "-c", "-o", str(tmp_path / "accumulate_kernel.o"), str(KERNEL_CU),
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        "-Werror", "all-warnings",
    ]  # fmt: skip
    began = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - began
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "accumulate_kernel.o").stat().st_size > 0
    print(f"nvcc -arch=sm_90 -c accumulate_kernel.cu: {seconds:.2f} s")

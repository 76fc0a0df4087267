"""The accumulate op, every available backend against the float64 per-sample oracle.

CPU runs use the plain-PyTorch backend, the compiled op's CPU implementation and the Triton
kernels under TRITON_INTERPRET=1 (set in conftest). gpu-marked tests repeat the suite on CUDA.
An unavailable backend shows as a skip with its reason.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from oracle import assert_sample_sq, assert_stats, moments, op_oracle, relative_error, sample_sq_oracle

from fimlora import LayerStats, backends

BACKENDS = [name for name in backends.BACKENDS if name != "auto"]
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
CUDA = torch.cuda.is_available()


def _need(backend: str, device: str | None = None) -> None:
    ok, reason = backends.backend_status(backend, device)
    if not ok:
        pytest.skip(f"backend {backend} unavailable: {reason}")


def _case(t, d_out, r, segments, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(t, d_out, generator=g).to(dtype).to(device)
    h = torch.randn(t, r, generator=g).to(dtype).to(device)
    return dy, h, torch.tensor(segments, dtype=torch.long).reshape(-1, 2).to(device)


SHAPES = {
    "basic": (24, 20, 8, [[0, 7], [7, 15], [15, 24]]),
    "r1": (10, 16, 1, [[0, 4], [4, 10]]),
    "odd_d_out": (12, 37, 5, [[0, 5], [5, 12]]),
    "empty_and_single": (9, 16, 4, [[0, 0], [0, 1], [1, 9], [9, 9]]),
    "gaps_unsorted": (20, 18, 6, [[12, 19], [0, 3], [5, 9]]),
    "long_segment": (70, 8, 3, [[0, 70]]),
    "wide_r": (12, 10, 40, [[0, 6], [6, 12]]),
}


def _run_suite_case(backend, shape, dtype, device):
    """Moments and per-sample squared norms (a tracking state) against the float64 oracle."""
    _need(backend, device)
    t, d_out, r, segments = SHAPES[shape]
    dy, h, seg = _case(t, d_out, r, segments, dtype, device=device)
    state = LayerStats.zeros(d_out, r, device=device, track_samples=True)
    mean_ptr, m2_ptr = state.mean.data_ptr(), state.m2.data_ptr()
    backends.accumulate(dy, h, seg, 0.5, state, backend=backend)
    assert (state.mean.data_ptr(), state.m2.data_ptr()) == (mean_ptr, m2_ptr), "state was reallocated"
    assert state.sample_sq().device == state.mean.device and state.sample_sq().dtype == torch.float32
    assert_stats(state, op_oracle(dy, h, seg.cpu(), 0.5), TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_oracle(backend, shape, dtype):
    _run_suite_case(backend, shape, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_oracle_on_cuda(backend, shape, dtype):
    _run_suite_case(backend, shape, dtype, "cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_padded(backend):
    """The same three samples, packed back to back or padded into rows, give the same statistics."""
    _need(backend)
    lengths, d_out, r = [5, 2, 7], 12, 4
    packed_dy, packed_h, _ = _case(sum(lengths), d_out, r, [])
    starts = torch.tensor([0, 5, 7])
    packed_seg = torch.stack([starts, starts + torch.tensor(lengths)], dim=1)
    width = max(lengths)
    padded_dy = torch.zeros(len(lengths) * width, d_out)
    padded_h = torch.full((len(lengths) * width, r), 3.0)  # padding junk must be ignored
    padded_seg = []
    for i, (start, length) in enumerate(zip(starts.tolist(), lengths, strict=True)):
        row = i * width + (width - length)  # left padded
        padded_dy[row : row + length] = packed_dy[start : start + length]
        padded_h[row : row + length] = packed_h[start : start + length]
        padded_seg.append([row, row + length])
    a, b = LayerStats.zeros(d_out, r), LayerStats.zeros(d_out, r)
    backends.accumulate(packed_dy, packed_h, packed_seg, 1.0, a, backend=backend)
    backends.accumulate(padded_dy, padded_h, torch.tensor(padded_seg), 1.0, b, backend=backend)
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.m2, b.m2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_small_calls_equal_one_large_call(backend):
    _need(backend)
    dy, h, seg = _case(30, 16, 6, [[0, 4], [4, 9], [9, 10], [10, 18], [18, 25], [25, 30]])
    once, piecewise = LayerStats.zeros(16, 6), LayerStats.zeros(16, 6)
    backends.accumulate(dy, h, seg, 2.0, once, backend=backend)
    for i in range(0, 6, 2):
        backends.accumulate(dy, h, seg[i : i + 2], 2.0, piecewise, backend=backend)
    assert once.count == piecewise.count == 6
    torch.testing.assert_close(piecewise.mean, once.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(piecewise.m2, once.m2, rtol=1e-4, atol=1e-5)
    assert_stats(piecewise, op_oracle(dy, h, seg, 2.0), TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_stable_when_the_mean_dwarfs_the_spread(backend):
    """|mean| = 1e4 x std: a sum-of-squares formula would lose every digit of the variance in fp32."""
    _need(backend)
    n, d_out, r = 16, 8, 4
    g = torch.Generator().manual_seed(1)
    h = torch.ones(n, r)  # one token per sample: G_n = dy_n h^T
    dy = 1e4 + torch.randn(n, d_out, generator=g)
    seg = torch.stack([torch.arange(n), torch.arange(n) + 1], dim=1)
    state = LayerStats.zeros(d_out, r)
    backends.accumulate(dy, h, seg, 1.0, state, backend=backend)
    expected = moments(op_oracle(dy, h, seg, 1.0))
    assert relative_error(state.variance(), expected["variance"]) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_granularity(backend):
    _need(backend)
    dy, h, seg = _case(16, 10, 3, [[0, 5], [6, 11], [11, 16]])
    grads = op_oracle(dy, h, seg, 0.25)
    per_batch = LayerStats.zeros(10, 3)
    for _ in range(2):
        backends.accumulate(dy, h, seg, 0.25, per_batch, backend=backend, granularity="batch")
    assert per_batch.count == 2
    assert relative_error(per_batch.mean, grads.mean(0)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_tracking_norms_leaves_the_moments_bit_identical(backend):
    """The norms are an extra output: the moments are exactly those of an untracked call."""
    _need(backend)
    dy, h, seg = _case(30, 16, 6, [[0, 4], [4, 9], [9, 9], [10, 18], [18, 30]])
    plain, tracked = LayerStats.zeros(16, 6), LayerStats.zeros(16, 6, track_samples=True)
    for state in (plain, tracked):
        for chunk in (seg[:2], seg[2:]):
            backends.accumulate(dy, h, chunk, 2.0, state, backend=backend)
    assert tracked.count == plain.count == 5 and tracked.num_sample_norms == 5
    assert torch.equal(tracked.mean, plain.mean) and torch.equal(tracked.m2, plain.m2)
    # several calls append in call order; an empty sample has norm 0
    assert_sample_sq(tracked, sample_sq_oracle(op_oracle(dy, h, seg, 2.0)), TOLERANCE[torch.float32])
    assert float(tracked.sample_sq()[2]) == 0.0
    with pytest.raises(RuntimeError, match="confidence=True"):
        plain.sample_sq_norms()


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_granularity_keeps_one_norm_per_batch(backend):
    _need(backend)
    dy, h, seg = _case(16, 10, 3, [[0, 5], [6, 11], [11, 16]])
    batch_grad = op_oracle(dy, h, seg, 0.25).mean(0)
    state = LayerStats.zeros(10, 3, track_samples=True)
    for _ in range(2):
        backends.accumulate(dy, h, seg, 0.25, state, backend=backend, granularity="batch")
    backends.accumulate(dy, h, seg[:0], 0.25, state, backend=backend, granularity="batch")  # no sample: nothing
    assert state.count == state.num_sample_norms == 2
    assert_sample_sq(state, sample_sq_oracle(torch.stack([batch_grad, batch_grad])), 1e-5)


def test_bad_inputs_are_named():
    state = LayerStats.zeros(4, 2)
    with pytest.raises(ValueError, match="same T"):
        backends.accumulate(torch.zeros(3, 4), torch.zeros(2, 2), torch.zeros(1, 2, dtype=torch.long), 1.0, state)
    with pytest.raises(ValueError, match="state has shape"):
        backends.accumulate(torch.zeros(3, 5), torch.zeros(3, 2), torch.zeros(1, 2, dtype=torch.long), 1.0, state)
    with pytest.raises(ValueError, match="int64 \\(S, 2\\)"):
        backends.accumulate(torch.zeros(3, 4), torch.zeros(3, 2), torch.zeros(1, 2), 1.0, state)
    with pytest.raises(ValueError, match="granularity='token'"):
        backends.accumulate(torch.zeros(3, 4), torch.zeros(3, 2), torch.zeros(1, 2, dtype=torch.long), 1.0, state,
                            granularity="token")


def test_backend_selection(monkeypatch):
    with pytest.raises(ValueError, match="backend='magic' is not known"):
        backends.resolve_backend("magic")
    monkeypatch.setattr(backends, "backend_status", lambda name, device=None: (name == "torch", f"{name} is switched off"))
    with pytest.raises(RuntimeError, match="backend 'triton' is not available: triton is switched off. Use backend='auto'"):
        backends.resolve_backend("triton")
    assert backends.resolve_backend("auto", "cpu") == "torch"
    assert backends.resolve_backend("auto", "cuda") == "torch"
    monkeypatch.setenv("FIMLORA_BACKEND", "torch")
    assert backends.resolve_backend() == "torch"
    with backends.use_backend("torch"):
        assert backends.resolve_backend() == "torch"


def test_auto_prefers_fused_paths(monkeypatch):
    monkeypatch.setattr(backends, "backend_status", lambda name, device=None: (True, "on"))
    assert backends.resolve_backend("auto", "cuda") == "triton"
    assert backends.resolve_backend("auto", "cpu") == "compiled"
    assert backends.resolve_backend("auto", "cpu", torch.float64) == "torch"


def test_old_name_cuda_still_selects_the_compiled_backend(monkeypatch):
    monkeypatch.setattr(backends, "backend_status", lambda name, device=None: (True, "on"))
    monkeypatch.setenv("FIMLORA_BACKEND", "cuda")
    with pytest.warns(DeprecationWarning, match="FIMLORA_BACKEND='cuda' is deprecated: .* called 'compiled'"):
        assert backends.resolve_backend(None, "cpu") == "compiled"
    with pytest.warns(DeprecationWarning, match="backend='cuda' is deprecated"):
        assert backends.resolve_backend("cuda", "cpu") == "compiled"
    monkeypatch.setenv("FIMLORA_BACKEND", "magic")
    with pytest.raises(ValueError, match="FIMLORA_BACKEND='magic' is not known; choose one of auto, torch, triton, compiled"):
        backends.resolve_backend()


def test_describe_backends_says_what_runs_on_each_device(monkeypatch):
    on = {("torch", "cpu"), ("compiled", "cpu"), ("torch", "cuda"), ("triton", "cuda")}
    monkeypatch.setattr(backends, "backend_status", lambda name, device=None: (
        (name, torch.device(device).type) in on, f"{name} on {device}"))
    cpu, gpu = backends.describe_backends(["cpu", "cuda:1"])
    assert (cpu.device, cpu.requested, cpu.runs, cpu.problem) == ("cpu", "auto", "compiled", None)
    assert cpu.status == {"torch": (True, "torch on cpu"), "triton": (False, "triton on cpu"),
                          "compiled": (True, "compiled on cpu")}
    assert (gpu.device, gpu.runs) == ("cuda:1", "triton")
    assert cpu.lines()[0] == "      device cpu: auto runs compiled"
    assert "  backend triton: unavailable (triton on cpu)" in cpu.lines()
    (forced,) = backends.describe_backends(["cpu"], backend="triton")
    assert forced.runs is None and "backend 'triton' is not available on cpu: triton on cpu" in forced.problem
    assert forced.lines()[0].startswith("      device cpu: backend 'triton' is not available on cpu")
    with pytest.raises(ValueError, match="backend='magic' is not known"):
        backends.describe_backends(backend="magic")


def test_resolve_backends_per_device(monkeypatch):
    monkeypatch.setattr(backends, "backend_status", lambda name, device=None: (
        name == "torch" or (name == "triton") == (torch.device(device).type == "cuda"), "on"))
    devices = ["cuda:0", "cpu", torch.device("cuda", 0), "cuda:1"]
    assert backends.resolve_backends("auto", devices) == {"cuda:0": "triton", "cpu": "compiled", "cuda:1": "triton"}
    assert backends.resolve_backends(None, ["cpu"], torch.float64) == {"cpu": "torch"}
    with pytest.raises(RuntimeError, match="backend 'triton' is not available on cpu"):
        backends.resolve_backends("triton", devices)


def test_describe_backends_lists_cpu_and_every_visible_gpu():
    described = backends.describe_backends()
    assert [d.device for d in described] == ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    assert all(set(d.status) == set(backends.BACKENDS) - {"auto"} and d.runs in d.status for d in described)
    assert described[0].status["torch"] == (True, "plain PyTorch, always available")


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    from fimlora.backends import _triton

    if _triton.available()[1].startswith("triton is not installed"):
        pytest.skip("triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = _triton.available("cpu")
    assert not ok and "TRITON_INTERPRET=1" in reason


def test_import_works_without_triton_and_extension(tmp_path):
    """Block triton and the compiled extension: fimlora imports, says why, and still calibrates."""
    script = (
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "sys.modules['fimlora._C'] = None\n"
        "import fimlora, torch\n"
        "status = fimlora.available_backends()\n"
        "assert not status['triton'][0] and 'triton' in status['triton'][1], status\n"
        "assert not status['compiled'][0], status\n"
        "print(status['compiled'][1])\n"
        "from fimlora.backends import resolve_backend\n"
        "assert resolve_backend('auto', 'cpu') == 'torch'\n"
        "try:\n"
        "    resolve_backend('triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'pip install triton' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('triton should be unavailable')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr

"""Hooks that measure LoRA-B gradients without adding LoRA to the model (DESIGN §3).

For each target layer a forward hook computes h = A x and attaches, to that very output
tensor, a gradient hook that receives dy and folds the per-sample B gradients into the
layer's statistics. Because h travels in the closure of the hook on *that* output, a forward
re-run by gradient checkpointing creates a hook on a tensor that never receives a gradient,
so each real forward is counted exactly once.

A layer called several times in one forward (ALBERT's shared layers, weight tying) has one
per-sample gradient, the sum over its calls. Its (dy, h) pairs are kept until the backward is
over and then folded in as one sample each, its tokens of all calls together (so a kept
per-sample norm is that of the summed gradient, not a sum of norms); a layer called once (the
usual case) folds its gradient in as soon as it arrives, keeping nothing.

No parameter requires grad during calibration: only activation gradients flow. A layer whose
input carries no gradient (the first target, say) gets its output tied to a scalar anchor by
a zero-copy identity op so that the backward reaches it without touching the embeddings.
Everything is undone on exit, exceptions included.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import backends
from .samples import SampleLayout, row_segments, whole_rows
from .stats import LayerStats
from .targets import is_lora_layer, layer_device, layer_shape


def draw_calibration_a(name: str, d_in: int, r: int, seed: int = 0) -> torch.Tensor:
    """The calibration A of layer ``name``: PEFT's default LoRA-A init (kaiming_uniform_,
    a=sqrt(5), i.e. U(-1/sqrt(d_in), 1/sqrt(d_in))), drawn from a generator seeded by the
    seed and the layer name so that every layer's A is reproducible on its own."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    a = torch.empty(r, d_in)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


class _AttachToAnchor(torch.autograd.Function):
    """Identity on ``y`` (a view, no copy) whose output requires grad through a scalar anchor."""

    @staticmethod
    def forward(ctx, y, anchor):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        return dy, None


@dataclass
class _Calls:
    """One layer's calls in the current batch."""

    forward: int = 0  # calls in the forward pass, with or without grad
    hooked: int = 0  # of those, the ones whose output carries a gradient hook
    recomputed: int = 0  # calls re-run in the backward (reentrant checkpointing) that got a hook
    pending: list = field(default_factory=list)  # (dy, h) of a layer called more than once


@dataclass
class LayerProbe:
    name: str
    module: nn.Module
    a: torch.Tensor | None  # (r, d_in) float32; None measures the full weight (h = x)
    scale: float
    state: LayerStats
    _a_cast: dict = field(default_factory=dict)
    calls: _Calls = field(default_factory=_Calls)
    # A PEFT LoRA layer's dropout: lora_A sees its output, not x (they differ in train mode)
    lora_dropout: nn.Module | None = None
    dropped_x: torch.Tensor | None = None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """h = A x, in the activations' dtype; x itself when there is no A."""
        if self.a is None:
            return x
        if x.dtype not in self._a_cast:
            self._a_cast[x.dtype] = self.a.to(x.dtype)
        return F.linear(x, self._a_cast[x.dtype])


def make_probe(name, module, *, rank, alpha, use_rslora, seed, stats_dtype, track_samples=False) -> LayerProbe:
    """Calibration A and scale for one layer: its own lora_A/scaling in a PEFT model, else drawn.
    ``track_samples`` keeps each sample's squared gradient norm in the layer's statistics."""
    d_in, d_out = layer_shape(module)
    weight_device = layer_device(module)
    if is_lora_layer(module):
        adapter = module.active_adapters[0]
        a = module.lora_A[adapter].weight.detach().float()
        scale = float(module.scaling[adapter])
        dropout = module.lora_dropout[adapter]
    else:
        a = draw_calibration_a(name, d_in, rank, seed).to(weight_device)
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        dropout = None
    state = LayerStats.zeros(d_out, a.shape[0], device=weight_device, dtype=stats_dtype, track_samples=track_samples)
    return LayerProbe(name, module, a, scale, state, lora_dropout=dropout)


class ProbeSession:
    """Context manager: hooks in, parameters frozen, eval mode; all restored on exit.

    ``set_batch`` must be called with the current batch's samples between its forward and its
    backward, and ``finish_batch`` after the backward.
    """

    def __init__(self, model: nn.Module, probes: list[LayerProbe], *, granularity="sample", backend=None, train=False):
        self.model = model
        self.probes = probes
        self.granularity = granularity
        self.backend = backend
        self.train = train
        # positions a layer sees per batch -> the [start, end) ranges of each sample among them:
        # N*L token positions for most layers, N rows for a layer after pooling
        self._layouts: dict[int, torch.Tensor] = {}
        self._handles = []
        self._saved_requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._saved_training: list[tuple[nn.Module, bool]] = []
        self._anchor = torch.zeros((), requires_grad=True)
        self._in_backward = False

    def __enter__(self) -> ProbeSession:
        try:
            self._saved_requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
            modules = list(self.model.modules())
            self._saved_training = [(m, m.training) for m in modules]
            for p, _ in self._saved_requires_grad:
                p.requires_grad_(False)
            self.model.train(self.train)
            for probe in self.probes:
                self._handles.append(probe.module.register_forward_hook(self._forward_hook(probe)))
                if probe.lora_dropout is not None:
                    self._handles.append(probe.lora_dropout.register_forward_hook(_keep_dropped_input(probe)))
            needs_input_grad = any(
                getattr(m, "gradient_checkpointing", False) is True or _repacks_without_input_grad(m) for m in modules
            )
            if needs_input_grad and hasattr(self.model, "get_input_embeddings"):
                # Reentrant checkpointing runs the first forward without grad; a checkpointed block
                # is only re-run in backward if its input requires grad (what transformers'
                # enable_input_require_grads does). Inputs that need grad also keep layers that
                # rewrite their weights for inference from doing so during calibration.
                embeddings = self.model.get_input_embeddings()
                self._handles.append(embeddings.register_forward_hook(lambda m, i, out: out.requires_grad_(True)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p, flag in self._saved_requires_grad:
            p.requires_grad_(flag)
        for m, flag in self._saved_training:
            m.training = flag
        self._layouts = {}
        for probe in self.probes:
            probe.calls, probe.dropped_x = _Calls(), None

    def set_batch(self, layout: SampleLayout, keep: torch.Tensor | None, row_lengths: tuple[int, ...] = ()) -> None:
        """Tell the hooks which tokens form each sample of the batch about to be back-propagated;
        samples with ``keep`` False (no loss) are left out.

        ``row_lengths`` (encoder-decoder models: the encoder's and the decoder's lengths) makes
        every row of each length one sample, padding included: a layer's positions then say
        which stream it is in, and padding positions get no gradient in either stream.
        """
        segments = layout.segments if keep is None else layout.segments[keep]
        self._layouts = {layout.index.numel(): segments}
        n = layout.index.shape[0]
        for length in row_lengths:
            rows = whole_rows(n, length, device=segments.device)
            self._layouts[n * length] = rows if keep is None else rows[keep]
        if not layout.packed:  # one sample per row: a pooled layer's rows are its samples
            rows = row_segments(n, device=segments.device)
            self._layouts.setdefault(n, rows if keep is None else rows[keep])
        self._in_backward = True

    def finish_batch(self) -> None:
        """Fold in the layers called more than once, now that all their calls' gradients are in."""
        for probe in self.probes:
            if probe.calls.pending:
                dy, h, segments = _join_calls(probe, probe.calls.pending, self._layouts)
                backends.accumulate(dy, h, segments, probe.scale, probe.state,
                                    granularity=self.granularity, backend=self.backend)
            probe.calls = _Calls()
        self._in_backward = False

    def _segments(self, probe: LayerProbe, positions: int) -> torch.Tensor:
        segments = self._layouts.get(positions)
        if segments is None:
            raise RuntimeError(
                f"layer {probe.name} saw {positions} positions, which is neither the batch's "
                f"tokens nor its rows {tuple(self._layouts)}; fimlora needs target layers that act "
                "on (batch, seq, features) or (batch, features)"
            )
        return segments

    def _wants_hook(self, probe: LayerProbe) -> bool:
        """Count this call; False for a call whose output never receives a gradient: one without
        grad, or a non-reentrant checkpoint's re-run of a call already hooked in the forward."""
        calls = probe.calls
        if not self._in_backward:
            calls.forward += 1
            calls.hooked += torch.is_grad_enabled()
            return torch.is_grad_enabled()
        # In the backward only reentrant checkpointing re-runs the calls its forward ran without grad.
        if not torch.is_grad_enabled() or calls.recomputed >= calls.forward - calls.hooked:
            return False
        calls.recomputed += 1
        return True

    def _forward_hook(self, probe: LayerProbe):
        d_out = probe.state.shape[0]

        def hook(module, args, output):
            dropped_x, probe.dropped_x = probe.dropped_x, None
            x = args[0] if args else None
            if not isinstance(output, torch.Tensor) or not isinstance(x, torch.Tensor):
                return None
            if not self._wants_hook(probe):
                return None
            if not output.requires_grad:
                output = _AttachToAnchor.apply(output, self._anchor)
            h = probe.project((x if dropped_x is None else dropped_x).detach()).reshape(-1, probe.state.shape[1])

            def on_grad(dy: torch.Tensor) -> None:
                dy = dy.reshape(-1, d_out)
                segments = self._segments(probe, dy.shape[0])
                if probe.calls.forward > 1:  # the sample's gradient sums over calls: wait for all
                    probe.calls.pending.append((dy, h))
                    return
                backends.accumulate(
                    dy, h, segments, probe.scale, probe.state,
                    granularity=self.granularity, backend=self.backend,
                )

            output.register_hook(on_grad)
            return output

        return hook


def _repacks_without_input_grad(module: nn.Module) -> bool:
    """bitsandbytes' 4-bit linear repacks its weight in place, for a CPU inference kernel, when
    called in eval mode on an input that needs no grad (seen with bitsandbytes 0.50 on CPUs with
    AVX512-BF16); calibration must leave the model as it found it."""
    return any(cls.__name__ == "Linear4bit" for cls in type(module).__mro__)


def _keep_dropped_input(probe: LayerProbe):
    """Forward hook on a LoRA layer's dropout: keep what its lora_A is about to see."""

    def hook(module, args, output):
        probe.dropped_x = output

    return hook


def _join_calls(probe: LayerProbe, pending: list, layouts: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, h, segments) with each sample's tokens of every call side by side, so that one
    per-sample outer-product sum over them is the gradient of the shared weight."""
    positions = {dy.shape[0] for dy, _ in pending}
    if len(positions) != 1:
        raise RuntimeError(
            f"layer {probe.name} was called {len(pending)} times in one forward on different numbers of "
            f"positions {sorted(positions)}; fimlora can sum a shared layer's calls only when each sees the "
            "whole batch; leave it out of the targets"
        )
    (count,) = positions
    segments = layouts[count]
    calls = len(pending)
    lengths = segments[:, 1] - segments[:, 0]
    device = segments.device
    sample = torch.repeat_interleave(torch.arange(len(segments), device=device), lengths)
    offset_in_segment = torch.arange(int(lengths.sum()), device=device) - (lengths.cumsum(0) - lengths)[sample]
    token = segments[:, 0][sample] + offset_in_segment  # every sample's positions within one call
    # their positions in the calls laid end to end, then grouped by sample (calls in order)
    index = (token[None, :] + count * torch.arange(calls, device=device)[:, None]).flatten()
    index = index[torch.sort(sample.repeat(calls), stable=True).indices]
    joined_lengths = lengths * calls
    ends = joined_lengths.cumsum(0)
    joined = torch.stack([ends - joined_lengths, ends], dim=1)
    dy = torch.cat([d for d, _ in pending])[index]
    h = torch.cat([x for _, x in pending])[index]
    return dy, h, joined

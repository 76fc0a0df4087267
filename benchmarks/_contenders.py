"""The contenders of calibration_overhead.py (and memory_vs_fisher.py): the workloads they run
on and one function per method that prepares it, with the conventions that make every method see
the same per-sample loss (see calibration_overhead.py's docstring)."""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import op_backends  # noqa: E402
from _memory import Skip  # noqa: E402
from _workloads import (  # noqa: E402
    Prepared,
    Workload,
    additive_mask,
    batch_losses,
    freeze,
    from_sums,
    has_loss,
    input_grad_hook,
    model_inputs,
    moments,
    row_loss,
    statistic_layers,
    tensor_bytes,
    timed,
)

import fimlora  # noqa: E402
from fimlora import LayerStats, backends  # noqa: E402

# What the isolated children import once, in the fork server (benchmarks/_memory.py), and whose
# versions the rows record.
PRELOAD = ["torch", "torch.func", "transformers", "transformers.models.llama.modeling_llama", "peft", "fimlora",
           "fimlora._C", "opacus", "backpack"]
VERSIONS = ("torch", "transformers", "peft", "opacus", "backpack-for-pytorch")

# ---------------------------------------------------------------- the contenders: (workload, spec) -> Prepared

def floor_pass(model: nn.Module, batches: list[dict], task: str) -> None:
    """Forward + activation-only backward of every batch, with no statistic at all."""
    handle = input_grad_hook(model)
    try:
        for batch in batches:
            losses, _ = batch_losses(model, batch, task)
            losses.sum().backward()
    finally:
        handle.remove()


def floor(w: Workload, spec: dict) -> Prepared:
    freeze(w.model)
    return Prepared(lambda: floor_pass(w.model, w.batches, w.task))


def backend_unavailable(method: str) -> str | None:
    """Why a ``fimlora-<backend>`` method cannot run on this CPU machine (None: it can, or it is
    not a fimlora method). Asked in the parent, so that no process is started just to skip."""
    if not method.startswith("fimlora-"):
        return None
    backend = method.removeprefix("fimlora-")
    ok, reason = backends.backend_status(backend)
    if not ok:
        return f"fimlora backend {backend!r} unavailable: {reason}"
    if backend == "triton" and not torch.cuda.is_available():
        return "fimlora backend 'triton' runs on CPU only under TRITON_INTERPRET=1, a test tool, not a CPU path"
    return None


def fimlora_method(backend: str) -> Callable[[Workload, dict], Prepared]:
    def prepare(w: Workload, spec: dict) -> Prepared:
        reason = backend_unavailable(f"fimlora-{backend}")
        if reason:
            raise Skip(reason)

        def run():
            result = fimlora.calibrate(w.model, w.batches, targets=w.names, task=w.task, num_batches=len(w.batches),
                                       rank=w.rank, alpha=w.alpha, backend=backend, progress=False)
            return moments(result.stats)

        return Prepared(run)

    return prepare


def peft_backward(w: Workload, spec: dict) -> Prepared:
    model, layers = statistic_layers(w, spec.get("mode", "lora"))
    for layer in layers.values():
        layer.weight.requires_grad_(True)

    def run():
        sums = {name: 0.0 for name in layers}
        for batch in w.batches:
            losses, _ = batch_losses(model, batch, w.task)
            losses.sum().backward()
            for name, layer in layers.items():
                sums[name] = sums[name] + layer.weight.grad
                layer.weight.grad = None
        return {name: {"sum": total} for name, total in sums.items()}

    return Prepared(run)


def batch_size_one(w: Workload, spec: dict) -> Prepared:
    model, layers = statistic_layers(w, spec.get("mode", "lora"))
    for layer in layers.values():
        layer.weight.requires_grad_(True)

    def run():
        stats = {name: LayerStats.zeros(*layer.weight.shape) for name, layer in layers.items()}
        for batch in w.batches:
            for i in range(batch["input_ids"].shape[0]):
                real = batch["attention_mask"][i].bool()  # the sample alone, without padding
                row = {k: v[i : i + 1, real] if v.shape == batch["attention_mask"].shape else v[i : i + 1]
                       for k, v in batch.items()}
                losses, keep = batch_losses(model, row, w.task)
                if not bool(keep.all()):
                    continue  # no loss (nothing to predict): not a sample, as in fimlora
                losses.sum().backward()
                for name, layer in layers.items():
                    stats[name].update_(layer.weight.grad[None])
                    layer.weight.grad = None
        return moments(stats)

    return Prepared(run)


def bmm_hook(w: Workload, spec: dict) -> Prepared:
    model, layers = statistic_layers(w, spec.get("mode", "lora"))
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}

    def forward_hook(name):
        def hook(module, args, output):
            rows = args[0].shape[0]
            h = args[0].detach().reshape(rows, -1, args[0].shape[-1])

            def on_grad(dy):
                per_sample = torch.bmm(dy.reshape(rows, -1, dy.shape[-1]).transpose(1, 2), h)  # (N, d_out, k)
                sums[name] = sums.get(name, 0) + per_sample.sum(0)
                squares[name] = squares.get(name, 0) + per_sample.square().sum(0)

            output.register_hook(on_grad)

        return hook

    for name, layer in layers.items():
        layer.register_forward_hook(forward_hook(name))

    def run():
        sums.clear()
        squares.clear()
        count = 0
        handle = input_grad_hook(model)
        try:
            for batch in w.batches:
                losses, _ = batch_losses(model, batch, w.task)
                losses.sum().backward()
                count += losses.shape[0]
        finally:
            handle.remove()
        return from_sums(sums, squares, count)

    return Prepared(run)


def opacus_method(w: Workload, spec: dict) -> Prepared:
    try:
        from opacus import GradSampleModule
    except ImportError as error:
        raise Skip(f"opacus is not installed ({error}); pip install opacus (with torch pinned)") from error
    model, layers = statistic_layers(w, spec.get("mode", "lora"))
    for layer in layers.values():
        layer.weight.requires_grad_(True)
    sampled = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    sampled.eval()
    for layer in layers.values():
        layer.train()  # Opacus records activations only from modules in train mode
    prepared = Prepared(lambda: None, {"per_sample_bytes": 0})

    def run():
        stats = {name: LayerStats.zeros(*layer.weight.shape) for name, layer in layers.items()}
        for batch in w.batches:
            losses, keep = batch_losses(sampled, batch, w.task)
            losses.sum().backward()
            held = sum(tensor_bytes(layer.weight.grad_sample) for layer in layers.values())
            prepared.info["per_sample_bytes"] = max(prepared.info["per_sample_bytes"], held)
            for name, layer in layers.items():
                stats[name].update_(layer.weight.grad_sample[keep])
                layer.weight.grad_sample = None
                layer.weight.grad = None
        return moments(stats)

    prepared.run = run
    return prepared


def backpack_method(w: Workload, spec: dict) -> Prepared:
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad, SumGradSquared
    except ImportError as error:
        raise Skip(f"BackPACK is not installed ({error}); pip install --no-deps backpack-for-pytorch "
                   "einops 'unfoldNd<1'") from error
    model, layers = statistic_layers(w, spec.get("mode", "lora"))
    for layer in layers.values():
        layer.weight.requires_grad_(True)
        extend(layer)
    prepared = Prepared(lambda: None, {"per_sample_bytes": 0})

    def run():
        sums = {name: 0.0 for name in layers}
        squares = {name: 0.0 for name in layers}
        count = 0
        for batch in w.batches:
            losses, _ = batch_losses(model, batch, w.task)
            with backpack(BatchGrad(), SumGradSquared()):
                losses.sum().backward()
            count += losses.shape[0]
            held = sum(tensor_bytes(layer.weight.grad_batch) for layer in layers.values())
            prepared.info["per_sample_bytes"] = max(prepared.info["per_sample_bytes"], held)
            for name, layer in layers.items():
                weight = layer.weight
                sums[name] = sums[name] + weight.grad_batch.sum(0)
                squares[name] = squares[name] + weight.sum_grad_squared
                del weight.grad_batch, weight.sum_grad_squared
                weight.grad = None
        return from_sums(sums, squares, count)

    prepared.run = run
    return prepared


def torch_func_method(w: Workload, spec: dict) -> Prepared:
    from torch.func import grad, vmap

    model, layers = statistic_layers(w, spec.get("mode", "lora"))
    by_tensor = {id(p): name for name, p in model.named_parameters()}
    param_names = {name: by_tensor[id(layer.weight)] for name, layer in layers.items()}
    problem_type = getattr(getattr(model, "config", None), "problem_type", None)

    def per_sample_grads(params: dict, batch: dict) -> dict:
        inputs = model_inputs(model, batch)  # decided for the whole batch, outside vmap
        rows = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        options = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}
        if not bool(batch["attention_mask"].all()):  # an all-ones mask is the same as none
            rows["model_mask"] = additive_mask(batch["attention_mask"], causal=w.task == "causal-lm")

        def loss(params, row):
            return row_loss(model, params, row, options=options, task=w.task, problem_type=problem_type)

        return vmap(grad(loss), in_dims=(None, 0))(params, rows)

    prepared = Prepared(lambda: None, {"per_sample_bytes": 0})

    def run():
        stats = {name: LayerStats.zeros(*layer.weight.shape) for name, layer in layers.items()}
        params = {param_names[name]: layer.weight.detach() for name, layer in layers.items()}
        for batch in w.batches:
            grads = per_sample_grads(params, batch)
            held = sum(tensor_bytes(g) for g in grads.values())
            prepared.info["per_sample_bytes"] = max(prepared.info["per_sample_bytes"], held)
            keep = has_loss(batch, w.task)
            for name in layers:
                stats[name].update_(grads[param_names[name]][keep])
        return moments(stats)

    prepared.run = run
    return prepared


CONTENDERS: dict[str, Callable[[Workload, dict], Prepared]] = {
    "floor": floor,
    **{f"fimlora-{name}": fimlora_method(name) for name in op_backends()},
    "peft": peft_backward,
    "bs1": batch_size_one,
    "bmm": bmm_hook,
    "opacus": opacus_method,
    "backpack": backpack_method,
    "torch.func": torch_func_method,
}


def measured(prepare: Callable[[Workload, dict], Prepared]) -> Callable[[Workload, dict], dict]:
    """A method for the memory harness: set up, then the passes of ``timed``."""
    def method(w: Workload, spec: dict) -> dict:
        prepared = prepare(w, spec)
        return {**timed(prepared.run, spec), **prepared.info}

    return method


def round_robin(w: Workload, spec: dict) -> dict:
    """Time every contender in this one process, each on its own copy of the model: one warm-up
    pass each, then ``repeats`` rounds of one pass each in turn, so that load from other
    processes on a shared machine falls on all of them alike. No memory figure (they share)."""
    runs, skipped, errors = {}, {}, {}
    for name in spec["contenders"]:
        own = replace(w, model=copy.deepcopy(w.model))
        try:
            runs[name] = CONTENDERS[name](own, spec).run
        except Skip as reason:
            skipped[name] = str(reason)
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(1 + spec.get("repeats", 2)):
        for name, run in list(runs.items()):
            started, cpu_started = time.perf_counter(), time.process_time()
            try:
                run()
            except Exception as error:  # reported in its row; the others go on
                errors[name] = f"{type(error).__name__}: {error}"
                del runs[name]
                continue
            if round_index:  # round 0 is the warm-up
                wall[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - cpu_started)
    return {"wall": wall, "cpu": cpu, "skipped": skipped, "errors": errors}

"""What the contenders of the benchmarks run on: Llama workloads built from config with seeded
weights, and the pieces every contender shares (losses written the way fimlora writes them,
LoRA wrapping with fimlora's calibration A, moments, timing)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import Skip  # noqa: E402

import fimlora  # noqa: E402
from fimlora import LayerStats  # noqa: E402
from fimlora.calibrate import ModelFeed  # noqa: E402  (the batch exactly as calibrate feeds it)
from fimlora.losses import IGNORE_INDEX, model_losses, seq_cls_losses  # noqa: E402
from fimlora.samples import sample_layout  # noqa: E402
from fimlora.targets import find_targets, plan_name  # noqa: E402

# The one table of model shapes of the benchmarks (Llama config numbers; weights are seeded or
# absent). Measured on CPU with real float32 weights: the 2-layer test model for --smoke, and the
# shapes of llama2.c's TinyStories checkpoints stories260K and stories15M. At scale (built on
# the meta device, or on a GPU in bf16): the published configs of LLaMA-2-7B and LLaMA-3-8B.
LLAMA_SHAPES = {
    "smoke-llama": dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2),
    "tiny-llama": dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5,  # stories260K
                       num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True),
    "small-llama": dict(vocab_size=32000, hidden_size=288, intermediate_size=768, num_hidden_layers=6,  # stories15M
                        num_attention_heads=6, num_key_value_heads=6, tie_word_embeddings=True),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8),
}
MEASURED_MODELS = ["smoke-llama", "tiny-llama", "small-llama"]  # small enough for float32 on a CPU
AT_SCALE_MODELS = ["llama-2-7b", "llama-3-8b"]


def llama_config(name: str, **overrides):
    """The transformers LlamaConfig of a shape of ``LLAMA_SHAPES``."""
    from transformers import LlamaConfig

    return LlamaConfig(**LLAMA_SHAPES[name], **overrides)


def meta_llama(name: str) -> nn.Module:
    """A shape of ``LLAMA_SHAPES`` as a LlamaForCausalLM on the meta device (no weights)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(llama_config(name))


# ---------------------------------------------------------------- the workload (built before the baseline)

@dataclass
class Workload:
    model: nn.Module
    batches: list[dict[str, torch.Tensor]]
    task: str
    names: list[str]  # target layers, by fimlora's (base-model) names
    rank: int
    alpha: float


def llama_model(name: str, seed: int = 0) -> nn.Module:
    """A shape of ``LLAMA_SHAPES`` with seeded random float32 weights, in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(name, max_position_embeddings=2048, attn_implementation="sdpa")).eval()


def token_batches(n: int, length: int, count: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Full rows of random tokens (ids avoid 0): every method sees the same tokens."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(1, vocab, (n, length), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


def build(spec: dict) -> Workload:
    if spec["model"] not in MEASURED_MODELS:
        raise Skip(f"unknown model {spec['model']!r}")
    model = llama_model(spec["model"], spec.get("seed", 0))
    batches = token_batches(spec["N"], spec["L"], spec.get("batches", 1), model.config.vocab_size, spec.get("seed", 0))
    names = [plan_name(name) for name in find_targets(model, "all-linear")]
    return Workload(model, batches, "causal-lm", names, spec.get("rank", 8), spec.get("alpha", 8.0))


# ---------------------------------------------------------------- shared pieces of the contenders

def model_inputs(model: nn.Module, batch: dict) -> dict:
    """The batch as fimlora.calibrate feeds it to the model (positions for left padding, no KV cache)."""
    return ModelFeed.for_model(model).prepare(batch)


def batch_losses(model: nn.Module, batch: dict, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample losses (N,) and which samples have one: fimlora's own definition."""
    layout = sample_layout(batch)
    return model_losses(model, model_inputs(model, batch), task, layout)


def row_loss(model: nn.Module, params: dict, row: dict, *, options: dict, task: str,
             problem_type: str | None) -> torch.Tensor:
    """One sample's loss for torch.func, which cannot trace fimlora's data-dependent bincount: the
    same definition written for a single row (the mean over the row's own counted targets).
    ``row`` holds one row of the batch's tensors (``model_mask``: its 4-D attention mask, when the
    batch is padded), ``options`` the model's other arguments."""
    from torch.func import functional_call

    inputs = {k: v[None] for k, v in row.items() if k not in ("labels", "attention_mask", "model_mask")}
    if "model_mask" in row:
        inputs["attention_mask"] = row["model_mask"][None]
    logits = functional_call(model, params, args=(), kwargs={**inputs, **options}, strict=False).logits[0]
    if task == "seq-cls":
        return seq_cls_losses(logits[None], row["labels"][None], problem_type)[0][0]
    mask = row["attention_mask"].bool()
    labels = row["labels"]
    counted = mask[:-1] & mask[1:] & (labels[1:] != IGNORE_INDEX)
    token_loss = F.cross_entropy(logits[:-1].float(), labels[1:].clamp(min=0), reduction="none")
    return (token_loss * counted).sum() / counted.sum().clamp(min=1)


def additive_mask(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """(N, 1, L, L) additive attention mask, which transformers passes through as given: its own
    mask building tests the 2-D mask with data-dependent control flow, which vmap cannot trace."""
    allowed = mask.bool()[:, None, None, :].expand(-1, 1, mask.shape[1], -1)
    if causal:
        allowed = allowed & torch.ones(mask.shape[1], mask.shape[1], dtype=torch.bool).tril()
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def has_loss(batch: dict, task: str) -> torch.Tensor:
    """(N,) bool: rows that carry a loss (a causal-LM row needs one counted target), as fimlora counts samples."""
    if task == "seq-cls":
        return torch.ones(batch["input_ids"].shape[0], dtype=torch.bool)
    mask = batch["attention_mask"].bool()
    return (mask[:, :-1] & mask[:, 1:] & (batch["labels"][:, 1:] != IGNORE_INDEX)).any(dim=1)


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def lora_b_layers(w: Workload) -> tuple[nn.Module, dict[str, nn.Linear]]:
    """Wrap the model with PEFT LoRA (the calibration A, B = 0, everything frozen): its lora_B
    layers, whose weight gradient is exactly fimlora's G_n (PEFT scales after lora_B)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise Skip(f"peft is not installed ({error})") from error
    config = LoraConfig(r=w.rank, lora_alpha=w.alpha, target_modules=w.names, lora_dropout=0.0)
    peft_model = get_peft_model(w.model, config)
    freeze(peft_model)
    layers = {}
    for name in w.names:
        layer = peft_model.base_model.model.get_submodule(name)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(fimlora.draw_calibration_a(name, layer.in_features, w.rank, 0))
        layers[name] = layer.lora_B["default"]
    return peft_model, layers


def statistic_layers(w: Workload, mode: str) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The model to run and the layers whose weight's per-sample statistics are wanted:
    the lora_B layers ("lora") or the target layers themselves ("full")."""
    if mode == "lora":
        return lora_b_layers(w)
    freeze(w.model)
    return w.model, {name: w.model.get_submodule(name) for name in w.names}


def input_grad_hook(model: nn.Module):
    """Make the embeddings' output require grad (activation-only backward); returns the handle."""
    return model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def moments(stats: dict[str, LayerStats]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {"mean": s.mean, "fisher": s.fisher(), "count": torch.tensor(s.count)} for name, s in stats.items()}


def from_sums(sums: dict, squares: dict, count: int) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {"mean": sums[name] / count, "fisher": squares[name] / count, "count": torch.tensor(count)}
            for name in sums}


@dataclass
class Prepared:
    """A contender set up on a workload: ``run()`` makes one pass over the batches and returns its
    statistics; ``info`` collects what it measures along the way (per-sample bytes held)."""

    run: Callable[[], dict | None]
    info: dict = field(default_factory=dict)


def timed(run: Callable[[], object], spec: dict) -> dict:
    """One warm-up pass, then ``repeats`` timed passes (wall and process CPU seconds); the
    statistics of the last pass."""
    started = time.perf_counter()
    result = run()
    first = time.perf_counter() - started
    seconds, cpu_seconds = [], []
    for _ in range(spec.get("repeats", 2)):
        started, cpu_started = time.perf_counter(), time.process_time()
        result = run()
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
    return {"first_pass_s": first, "seconds": seconds, "cpu_seconds": cpu_seconds, "stats": result}

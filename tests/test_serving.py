"""export_for_serving writes what a LoRA server reads, and refuses what it cannot serve.

The reference is a loader written the way vLLM reads an adapter: from adapter_config.json only
the global ``lora_alpha`` and ``r`` (``alpha_pattern``/``rank_pattern`` ignored), each layer's rank
from its tensor shapes in adapter_model.safetensors, and W + (alpha / r) * B @ A applied by hand
to the base model's weights. Its outputs must equal the trained PEFT model's.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from models import batches_of, random_samples, tiny_llama
from peft import LoraConfig
from safetensors.torch import load_file

from fimlora import AllocationConfig, export_for_serving, get_peft_model
from fimlora.targets import is_lora_layer

KEY = re.compile(r"base_model\.model\.(?P<name>.+)\.lora_(?P<which>[AB])\.weight")


def _trained_peft_model(alpha_policy: str):
    """A planned adapter (ranks 2..8) whose B matrices are non-zero, as after training."""
    base = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                      use_rslora=alpha_policy == "rslora")
    peft_model = get_peft_model(tiny_llama(), batches_of(random_samples(16), 8), base,
                                allocation=AllocationConfig(alpha_policy=alpha_policy), progress=False, num_batches=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in peft_model.modules():
            if is_lora_layer(module):
                b = module.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
    return peft_model.eval()


def _serve_by_hand(base_model, directory):
    """Merge the exported adapter into ``base_model`` as a server with one global scale would."""
    config = json.loads((directory / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY.fullmatch(key)
        assert match, f"{key}: not a key a LoRA server reads"
        pairs.setdefault(match["name"], {})[match["which"]] = tensor
    modules = dict(base_model.named_modules())
    ranks = {}
    with torch.no_grad():
        for name, pair in pairs.items():
            a, b = pair["A"], pair["B"]
            assert a.shape[0] == b.shape[1], name
            ranks[name] = a.shape[0]
            modules[name].weight += scale * (b.double() @ a.double()).to(modules[name].weight.dtype)
    return base_model, ranks


@pytest.mark.parametrize("alpha_policy", ["fixed_scale", "fixed_alpha", "rslora"])
def test_a_server_with_one_global_scale_gives_the_peft_outputs(tmp_path, alpha_policy):
    peft_model = _trained_peft_model(alpha_policy)
    plan_ranks = {n: r for n, r in peft_model.fimlora_plan.ranks.items() if r > 0}
    assert len(set(plan_ranks.values())) > 1
    if alpha_policy != "fixed_scale":  # otherwise there would be nothing to fold
        assert len({m.scaling["default"] for m in peft_model.modules() if is_lora_layer(m)}) > 1
    out = export_for_serving(peft_model, tmp_path / "serve", max_lora_rank=max(plan_ranks.values()))

    served, ranks = _serve_by_hand(tiny_llama(), out)
    assert ranks == plan_ranks  # each layer's rank, read from its tensors
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_max_lora_rank_is_enforced_before_anything_is_written(tmp_path):
    peft_model = _trained_peft_model("fixed_scale")
    ranks = {n: r for n, r in peft_model.fimlora_plan.ranks.items() if r > 0}
    top = max(ranks.values())
    worst = next(name for name, rank in ranks.items() if rank == top)
    with pytest.raises(ValueError, match=rf"exceed max_lora_rank={top - 1}: .*{re.escape(worst)} has rank {top}") as error:
        export_for_serving(peft_model, tmp_path / "serve", max_lora_rank=top - 1)
    # the fix: re-plan with a lower cap, or raise the server's limit
    assert f"AllocationConfig(r_max={top - 1})" in str(error.value) and f"--max-lora-rank {top}" in str(error.value)
    assert not (tmp_path / "serve").exists()
    with pytest.raises(ValueError, match="max_lora_rank"):
        export_for_serving(peft_model, tmp_path / "serve", max_lora_rank=0)
    assert export_for_serving(peft_model, tmp_path / "serve", max_lora_rank=top).is_dir()

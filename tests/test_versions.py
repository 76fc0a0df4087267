"""The oldest PEFT and transformers that pyproject.toml admits load fimlora's adapters as planned.

The adapter's ``rank_pattern``/``alpha_pattern`` keys are anchored full names (``^name``), which
relies on how PEFT matches pattern keys. Here a separate virtual environment gets the lower bounds
of ``peft`` and ``transformers`` (and this session's CPU torch, pinned so pip never swaps it), and
vanilla PEFT there loads an adapter that fimlora wrote in this environment: every layer must get its
planned rank, and the outputs must equal this environment's PEFT model's. The base model travels
as a config and a safetensors file, so no version's random initialisation enters.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import require
from models import batches_of, random_samples, tiny_llama
from packaging.version import Version
from peft import LoraConfig
from safetensors.torch import load_file, save_file

import fimlora
from fimlora.targets import is_lora_layer

ROOT = Path(__file__).resolve().parents[1]

# Runs in the old environment. Part 1 is what a user of those versions has (no fimlora): vanilla
# PEFT loads the adapter written here. Part 2 runs fimlora itself there (the checkout on the path).
OLD_SIDE = r'''
import json, sys
from pathlib import Path
import peft, torch, transformers
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

work = Path(sys.argv[1])
setup = json.loads((work / "setup.json").read_text())

def base():
    model = LlamaForCausalLM(LlamaConfig(**setup["base_config"]))
    model.load_state_dict(load_file(str(work / "base.safetensors")), strict=True)
    return model.eval()

def lora_ranks(peft_model):
    return {name: module.r["default"] for name, module in peft_model.get_base_model().named_modules()
            if hasattr(module, "lora_A") and hasattr(module, "base_layer")}

report = {"peft": peft.__version__, "transformers": transformers.__version__}
model = PeftModel.from_pretrained(base(), str(work / "adapter")).eval()
report["loaded_ranks"] = lora_ranks(model)
with torch.no_grad():
    logits = model(input_ids=load_file(str(work / "inputs.safetensors"))["input_ids"]).logits
save_file({"logits": logits.contiguous()}, str(work / "old_logits.safetensors"))

import fimlora
tensors = load_file(str(work / "batches.safetensors"))
batches = [{key: tensors[f"{i}.{key}"] for key in ("input_ids", "attention_mask", "labels")}
           for i in range(setup["num_batches"])]
planned = fimlora.get_peft_model(base(), batches, LoraConfig(**setup["lora"]), progress=False,
                                 num_batches=setup["num_batches"])
report["planned"] = {name: rank for name, rank in planned.fimlora_plan.ranks.items() if rank > 0}
report["native_ranks"] = lora_ranks(planned)
print(json.dumps(report))
'''

BASE_CONFIG = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False)


def lower_bound(package: str) -> str:
    """The ``package>=X`` lower bound in pyproject.toml's dependencies."""
    match = re.search(rf'"{package}>=([0-9][0-9.]*)"', (ROOT / "pyproject.toml").read_text())
    assert match, f"pyproject.toml has no {package}>= lower bound"
    return match.group(1)


def _pip(python: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=timeout)


def _old_environment(root: Path, peft_version: str, transformers_version: str) -> Path:
    """A venv with this torch (the installed build, pinned by a constraint), the given versions and
    fimlora's other run-time dependencies (fimlora itself comes from the checkout, on PYTHONPATH)."""
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, capture_output=True, timeout=120)
    python = root / "venv" / "bin" / "python"
    pin = root / "constraints.txt"
    pin.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    for args in ([f"torch=={torch.__version__.split('+')[0]}"],
                 [f"peft=={peft_version}", f"transformers=={transformers_version}", "safetensors",
                  "tqdm", "matplotlib", "numpy"]):  # the last three: fimlora's own run-time needs
        done = _pip(python, "-c", str(pin), *args)
        if done.returncode != 0:
            offline = any(s in done.stderr for s in ("No matching distribution", "Could not find a version",
                                                     "NewConnectionError", "Network is unreachable",
                                                     "Temporary failure in name resolution"))
            require(not offline, f"pip cannot install {' '.join(args)} (no index reachable?): "
                                 f"{done.stderr.strip().splitlines()[-1]}")
            raise AssertionError(f"pip install {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return python


@pytest.mark.slow
def test_oldest_admitted_peft_and_transformers_load_the_planned_ranks(tmp_path):
    peft_version, transformers_version = lower_bound("peft"), lower_bound("transformers")
    python = _old_environment(tmp_path, peft_version, transformers_version)

    model = tiny_llama(**BASE_CONFIG)
    work = tmp_path / "work"
    work.mkdir()
    batches = batches_of(random_samples(16), 8)
    lora = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    (work / "setup.json").write_text(json.dumps({"base_config": BASE_CONFIG, "lora": lora,
                                                 "num_batches": len(batches)}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / "base.safetensors"))
    save_file({f"{i}.{k}": v for i, batch in enumerate(batches) for k, v in batch.items()},
              str(work / "batches.safetensors"))
    peft_model = fimlora.get_peft_model(model, batches, LoraConfig(**lora), progress=False, num_batches=len(batches))
    planned = {name: rank for name, rank in peft_model.fimlora_plan.ranks.items() if rank > 0}
    assert len(set(planned.values())) > 1, "a uniform plan would not test the pattern keys"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0, so every layer's rank and scale shows in the outputs
        for module in peft_model.modules():
            if is_lora_layer(module):
                b = module.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
    peft_model.save_pretrained(str(work / "adapter"))
    input_ids = torch.randint(1, 96, (2, 7), generator=g)
    save_file({"input_ids": input_ids}, str(work / "inputs.safetensors"))
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=input_ids).logits

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(python), "-c", OLD_SIDE, str(work)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0, f"peft {peft_version} / transformers {transformers_version}:\n{done.stderr[-4000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert Version(report["peft"]) == Version(peft_version)
    assert Version(report["transformers"]) == Version(transformers_version)
    # vanilla PEFT of those versions gives every layer its planned rank and the same outputs
    assert report["loaded_ranks"] == planned
    got = load_file(str(work / "old_logits.safetensors"))["logits"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # fimlora itself on those versions: the same plan from the same weights and batches, applied as planned
    assert report["planned"] == planned
    assert report["native_ranks"] == planned

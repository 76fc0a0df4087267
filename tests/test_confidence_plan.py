"""How sure is the rank map, end to end: a model whose layers' true importance is known (a
parallel stack of linears whose per-sample gradients are scaled by known factors), the plan's
intervals and stability, --num-batches auto, and the abstain policy on a flat model."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from peft import LoraConfig
from torch import nn

import fimlora
from fimlora.pipeline import UncertainMapError
from fimlora.plan import PLAN_FORMAT_VERSION, RankPlan

D, TOKENS = 32, 6


class Parallel(nn.Module):
    """Independent linears, each on its own slice of the input; sample n's loss is
    sum_l scale_l * <u_l, layer_l(x_{n,l})> summed over tokens, so layer l's B-gradient is scaled
    by scale_l and its score by scale_l^2: the truth is known up to the calibration A."""

    def __init__(self, scales: list[float]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in scales)
        self.register_buffer("scales", torch.tensor(scales))
        self.register_buffer("u", torch.randn(len(scales), D, generator=torch.Generator().manual_seed(1)))

    def forward(self, input_ids=None, attention_mask=None, features=None):
        return torch.stack([s * (layer(features[:, :, i]) * u).sum((-1, -2))
                            for i, (layer, s, u) in enumerate(zip(self.layers, self.scales, self.u, strict=True))], -1).sum(-1)


def loss_fn(model, batch):
    return model(**batch)


def batches(num: int, size: int = 8, seed: int = 0, layers: int = 12, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        # log-normal per-sample magnitudes: each sample's gradient norm varies (spread: their log sd)
        mag = torch.exp(spread * torch.randn(size, 1, layers, 1, generator=g))
        features = mag * torch.randn(size, TOKENS, layers, D, generator=g)
        out.append({"input_ids": torch.zeros(size, TOKENS, dtype=torch.long),
                    "attention_mask": torch.ones(size, TOKENS, dtype=torch.long), "features": features})
    return out


CONFIG = LoraConfig(r=8, lora_alpha=8, target_modules=["layers." + str(i) for i in range(12)])


def plan_for(scales, data, **kwargs) -> RankPlan:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fimlora.plan_model(Parallel(scales), data, CONFIG, loss_fn=loss_fn, progress=False, **kwargs)


DISTINCT = list(np.geomspace(0.2, 5.0, 12))


def test_distinct_layers_give_a_stable_confident_map_with_intervals_in_the_plan(tmp_path):
    plan = plan_for(DISTINCT, batches(8), num_batches=8)
    c = plan.confidence
    assert c is not None and c.samples == 64 and not c.flat and c.stable
    assert plan.decision["action"] == "allocated"
    ranks = list(plan.ranks.values())
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1]  # the known order of importance
    for layer in plan.layers:
        iv = c.layers[layer.name]
        assert iv.rank_lo <= layer.rank <= iv.rank_hi and iv.score_lo <= layer.score <= iv.score_hi
    assert "rank interval" in plan.table() and "stable" in plan.table()
    path = plan.save(tmp_path / "plan.json")
    again = RankPlan.load(path)
    assert again.confidence == c and again.decision == plan.decision
    assert json.loads(path.read_text())["format_version"] == PLAN_FORMAT_VERSION == 3
    plan.plot(tmp_path / "map.png")  # two panels: ranks and interval widths


@pytest.mark.parametrize("policy", ["uniform", "allocate", "error"])
def test_a_flat_model_triggers_the_abstain_path(policy):
    flat = [1.0] * 12
    allocation = fimlora.AllocationConfig(if_uncertain=policy)
    if policy == "error":
        with pytest.raises(UncertainMapError, match=r"flat|unstable.*--if-uncertain uniform"):
            plan_for(flat, batches(8, seed=3), num_batches=8, allocation=allocation)
        return
    plan = plan_for(flat, batches(8, seed=3), num_batches=8, allocation=allocation)
    assert plan.confidence.flat or not plan.confidence.stable
    if policy == "uniform":
        assert set(plan.ranks.values()) == {8} and plan.decision["action"] == "uniform"
        assert "ranks are uniform" in plan.table()
    else:
        assert len(set(plan.ranks.values())) > 1 and plan.decision["action"] == "allocated"
    assert plan.decision["reason"].startswith(("flat", "unstable"))


def test_pure_noise_never_yields_a_confident_allocation():
    """Flat truth, many independent draws of the data: the map is never called both stable and
    distinct enough to allocate (allowing the flatness test's nominal 5% false alarms)."""
    confident = 0
    for seed in range(10):
        plan = plan_for([1.0] * 12, batches(4, seed=100 + seed), num_batches=4)
        confident += plan.decision["action"] == "allocated"
    assert confident <= 2


def test_auto_stops_early_on_distinct_layers_and_later_when_the_truth_is_flatter():
    distinct = plan_for(DISTINCT, batches(24, seed=5), num_batches="auto", max_batches=24)
    closer = plan_for(list(np.geomspace(0.8, 1.25, 12)), batches(24, seed=5), num_batches="auto", max_batches=24)
    stop_d, stop_c = distinct.calibration["stop"], closer.calibration["stop"]
    print(f"auto stop: distinct layers after {stop_d['batches']} batches ({stop_d['why']}); "
          f"closer to flat after {stop_c['batches']} ({stop_c['why']})")
    assert stop_d["why"] == "the rank map was stable" and stop_d["batches"] < 24
    assert stop_c["batches"] > stop_d["batches"]
    assert distinct.calibration["num_batches"] == stop_d["batches"]  # one process: its batches are all batches


def test_a_format_2_plan_migrates_to_no_confidence_and_allocate():
    plan = RankPlan.load("tests/data/plan_format_1.json")  # format 1 -> 2 -> 3
    assert plan.confidence is None and plan.allocation.if_uncertain == "allocate"


def test_if_uncertain_is_checked_when_the_config_is_made():
    with pytest.raises(ValueError, match="if_uncertain='maybe' is not known"):
        fimlora.AllocationConfig(if_uncertain="maybe")

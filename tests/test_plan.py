"""Tests for fimlora.plan (rank plan file format, table, heatmap) and fimlora._io."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fimlora import AllocationConfig, Budget, _io
from fimlora._io import atomic_directory, atomic_write_bytes, atomic_write_text
from fimlora.plan import (
    PLAN_FORMAT_VERSION,
    LayerPlan,
    PlanError,
    RankPlan,
    split_block_and_type,
)

LLAMA_TYPES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def make_plan(names: list[str] | None = None, ranks: list[int] | None = None, **overrides: Any) -> RankPlan:
    """A small, valid plan; by default llama-like with 2 blocks x 7 module types."""
    if names is None:
        names = [f"model.layers.{b}.{t}" for b in range(2) for t in LLAMA_TYPES]
    if ranks is None:
        ranks = [(3 * i) % 17 for i in range(len(names))]  # includes 0 and varied values
    layers = [
        LayerPlan(name=n, d_in=64 + i, d_out=32 * (1 + i % 3), rank=r, alpha=2.0 * r, score=0.5 ** i * 1.2345,
                  stats={"count": 64, "variance": 0.25 * i, "fisher": 1.5, "mean_sq": 2.0 + i})
        for i, (n, r) in enumerate(zip(names, ranks, strict=True))
    ]
    fields: dict[str, Any] = dict(
        layers=layers,
        allocation=AllocationConfig(budget=Budget.mean_rank(8), r_min=4, r_max=16, alpha_policy="fixed_scale"),
        budget_total=sum(lp.params for lp in layers) + 1000,
        base_rank=8,
        base_alpha=16.0,
        calibration={"score": "fisher", "granularity": "layer", "num_batches": 4, "seed": 0,
                     "model": "tiny-llama", "samples": 32, "tokens": 4096},
        versions={"fimlora": "0.1.0", "torch": "2.3.0", "python": "3.11"},
    )
    fields.update(overrides)
    return RankPlan(**fields)


def plan_dict(**overrides: Any) -> dict[str, Any]:
    d = make_plan().to_dict()
    d.update(overrides)
    return d


# -- round trip ------------------------------------------------------------------


def test_round_trip_save_load(tmp_path: Path) -> None:
    plan = make_plan()
    path = plan.save(tmp_path / "plan.json")
    assert RankPlan.load(path) == plan
    data = json.loads(path.read_text())
    assert data["format_version"] == PLAN_FORMAT_VERSION
    assert [layer["name"] for layer in data["layers"]] == [lp.name for lp in plan.layers]


def test_properties() -> None:
    plan = make_plan()
    lp = plan.layers[1]
    assert lp.params == lp.rank * (lp.d_in + lp.d_out)
    assert plan.total_params == sum(x.rank * (x.d_in + x.d_out) for x in plan.layers)
    assert list(plan.ranks) == [x.name for x in plan.layers]
    assert plan.ranks[lp.name] == lp.rank and plan.alphas[lp.name] == lp.alpha


def test_to_json_is_deterministic_and_from_dict_round_trips() -> None:
    plan = make_plan()
    assert plan.to_json() == make_plan().to_json()
    assert RankPlan.from_dict(json.loads(plan.to_json())) == plan


def test_numpy_scalars_are_normalised(tmp_path: Path) -> None:
    import numpy as np

    plan = make_plan()
    plan.layers[0].rank = np.int64(5)  # type: ignore[assignment]
    plan.layers[0].score = np.float32(0.5)  # type: ignore[assignment]
    loaded = RankPlan.load(plan.save(tmp_path / "plan.json"))
    assert type(loaded.layers[0].rank) is int and loaded.layers[0].rank == 5
    assert type(loaded.layers[0].score) is float


def test_save_rejects_invalid_plan_and_keeps_file(tmp_path: Path) -> None:
    path = make_plan().save(tmp_path / "plan.json")
    before = path.read_bytes()
    bad = make_plan()
    bad.layers[0].rank = -1
    with pytest.raises(PlanError, match=r"layers\[0\]\.rank"):
        bad.save(path)
    assert path.read_bytes() == before


# -- validation ----------------------------------------------------------------


def _layer_override(i: int, **kv: Any) -> dict[str, Any]:
    d = make_plan().to_dict()
    d["layers"][i].update(kv)
    return d


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (_layer_override(3, rank=-1), r"layers\[3\]\.rank must be an integer >= 0"),
        (_layer_override(3, rank=2.5), r"layers\[3\]\.rank must be an integer"),
        (_layer_override(3, rank="4"), r"layers\[3\]\.rank must be an integer"),
        (_layer_override(2, score=float("nan")), r"layers\[2\]\.score must be a finite number"),
        (_layer_override(2, score=-1.0), r"layers\[2\]\.score must be a finite number >= 0"),
        (_layer_override(2, score=float("inf")), r"layers\[2\]\.score"),
        (_layer_override(1, d_in=0), r"layers\[1\]\.d_in must be an integer >= 1"),
        (_layer_override(1, d_out=0), r"layers\[1\]\.d_out must be an integer >= 1"),
        (_layer_override(1, name=""), r"layers\[1\]\.name"),
        (_layer_override(1, stats=[1, 2]), r"layers\[1\]\.stats must be a JSON object"),
        (_layer_override(1, extra=1), r"layers\[1\] has unexpected key\(s\) 'extra'"),
        (plan_dict(alpha_policy="sqrt"), r"alpha_policy must be one of fixed_scale, fixed_alpha, rslora"),
        (plan_dict(allocation={"r_min": 4, "r_max": 16, "multiple_of": 1, "temperature": 1.0}),
         r"allocation\.score is missing"),
        (plan_dict(allocation={"r_min": 9, "r_max": 4, "multiple_of": 1, "temperature": 1.0, "score": "variance",
                               "if_uncertain": "uniform"}),
         r"allocation is inconsistent \(AllocationConfig.r_min=9 is above r_max=4"),
        (plan_dict(budget={"kind": "rank", "value": 2.5, "total": 10 ** 9}), r"budget\.value is invalid .*whole number"),
        (plan_dict(layers=[]), r"layers is empty"),
        (plan_dict(layers={}), r"layers must be a JSON list"),
        (plan_dict(base_rank=True), r"base_rank must be an integer"),
        (plan_dict(versions="x"), r"versions must be a JSON object"),
        (plan_dict(bogus=1), r"plan has unexpected key\(s\) 'bogus'"),
        (plan_dict(budget={"kind": "params", "value": 1.0, "total": 10, "used": 1}),
         r"layers spend \d+ of the budget, over budget\.total \(10\)"),
        (plan_dict(budget={"kind": "flops", "value": 1.0, "total": 10 ** 9}), r"budget\.kind must be one of"),
        (plan_dict(budget={"kind": "params", "value": 1.0}), r"budget\.total is missing"),
        (plan_dict(format_version=999), r"format_version is 999: written by a newer fimlora.*upgrade"),
        (plan_dict(format_version=0), r"format_version must be an integer >= 1"),
        ([1, 2], r"plan must be a JSON object"),
    ],
)
def test_from_dict_validation(data: Any, pattern: str) -> None:
    with pytest.raises(PlanError, match=pattern):
        RankPlan.from_dict(data)


def test_missing_key_named() -> None:
    d = make_plan().to_dict()
    del d["layers"][4]["alpha"]
    with pytest.raises(PlanError, match=r"layers\[4\]\.alpha is missing"):
        RankPlan.from_dict(d)
    d = make_plan().to_dict()
    del d["base_alpha"]
    with pytest.raises(PlanError, match=r"base_alpha is missing"):
        RankPlan.from_dict(d)


def test_duplicate_layer_names() -> None:
    d = make_plan().to_dict()
    d["layers"][5]["name"] = d["layers"][2]["name"]
    with pytest.raises(PlanError, match=r"layers\[5\]\.name .* duplicates layers\[2\]\.name"):
        RankPlan.from_dict(d)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "newer.json"
    path.write_text(json.dumps(plan_dict(format_version=999, something_new={})))
    with pytest.raises(PlanError, match=r"newer\.json.*format_version is 999.*newer fimlora.*upgrade"):
        RankPlan.load(path)

    path = tmp_path / "badrank.json"
    path.write_text(json.dumps(_layer_override(3, rank=-2)))
    with pytest.raises(PlanError, match=r"badrank\.json: layers\[3\]\.rank"):
        RankPlan.load(path)

    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(make_plan().to_json()[:100])
    with pytest.raises(PlanError, match=r"corrupt\.json is not valid JSON \(line \d+"):
        RankPlan.load(corrupt)

    with pytest.raises(PlanError, match=r"cannot read plan file .*missing\.json"):
        RankPlan.load(tmp_path / "missing.json")


# -- atomic writes -------------------------------------------------------------


def test_atomic_write_text_and_bytes(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "sub" / "a.txt", "héllo")
    assert (tmp_path / "sub" / "a.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_save_failure_in_serialisation_keeps_original(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_plan().save(tmp_path / "plan.json")
    before = path.read_bytes()

    def boom(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(json, "dumps", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        make_plan(ranks=[1] * 14).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["plan.json"]


def test_save_failure_at_replace_keeps_original(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_plan().save(tmp_path / "plan.json")
    before = path.read_bytes()

    def boom(src: Any, dst: Any) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(_io.os, "replace", boom)
    with pytest.raises(OSError, match="rename failed"):
        make_plan(ranks=[1] * 14).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["plan.json"]


def test_failure_mid_write_keeps_original(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_plan().save(tmp_path / "plan.json")
    before = path.read_bytes()

    def boom(fd: int) -> None:
        raise OSError("fsync failed")

    monkeypatch.setattr(_io.os, "fsync", boom)  # the temp file is already written at this point
    with pytest.raises(OSError, match="fsync failed"):
        make_plan(ranks=[1] * 14).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["plan.json"]


def test_atomic_directory_success(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "adapter"
    with atomic_directory(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".adapter.tmp-")
        (tmp / "x.txt").write_text("1")
    assert (out / "x.txt").read_text() == "1"
    assert os.listdir(out.parent) == ["adapter"]


def test_atomic_directory_exception_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    with pytest.raises(KeyError), atomic_directory(out) as tmp:
        (tmp / "x.txt").write_text("1")
        raise KeyError("fail")
    assert os.listdir(tmp_path) == []


def test_atomic_directory_existing(tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"), atomic_directory(out):
        pass
    assert (out / "old.txt").exists()

    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(out)) == ["new.txt"]
    assert os.listdir(tmp_path) == ["adapter"]


def test_atomic_directory_overwrite_failure_keeps_old(tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ValueError), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise ValueError
    assert os.listdir(out) == ["old.txt"]
    assert os.listdir(tmp_path) == ["adapter"]


# -- table ---------------------------------------------------------------------


def test_table_lists_layers_and_footer() -> None:
    plan = make_plan()
    text = plan.table()
    for lp in plan.layers:
        assert lp.name in text
        assert f"{lp.d_out} x {lp.d_in}" in text
    ranks = [lp.rank for lp in plan.layers]
    used = sum(lp.rank * (lp.d_in + lp.d_out) for lp in plan.layers)
    total = plan.budget_total
    footer = text.splitlines()[-1]
    assert f"{len(ranks)} layers" in footer
    assert f"{min(ranks)}/{sum(ranks) / len(ranks):.2f}/{max(ranks)}" in footer
    assert f"{used:,} / {total:,}" in footer
    assert f"{100 * used / total:.1f}%" in footer
    assert "fixed_scale" in footer
    assert f"{plan.layers[1].score:.2e}" in text


def test_rank_budget_is_reported_in_ranks_and_derived_from_the_layers() -> None:
    plan = make_plan()
    plan.allocation = dataclasses.replace(plan.allocation, budget=Budget.total_rank(100))
    plan.budget_total = 100
    used = sum(lp.rank for lp in plan.layers)
    assert plan.budget_used == used
    assert f"ranks {used:,} / 100 budget ({used:.1f}%)" in plan.table().splitlines()[-1]
    plan.layers[0].rank += 1  # edited by hand: the file says what the layers now spend
    assert plan.to_dict()["budget"]["used"] == used + 1


def test_table_columns_aligned() -> None:
    lines = make_plan().table().splitlines()
    rows = lines[2:-2]
    # Right-aligned numeric columns: every row has the same length as the header rule.
    assert len({len(r) for r in rows}) == 1
    assert len(rows[0]) == len(lines[1])


def test_table_max_rows() -> None:
    plan = make_plan()
    text = plan.table(max_rows=4)
    names = [lp.name for lp in plan.layers]
    shown = [n for n in names if n in text]
    assert shown == names[:2] + names[-2:]
    assert f"... {len(names) - 4} more ..." in text
    assert plan.table(max_rows=100) == plan.table()


# -- names and plots -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.3.self_attn.q_proj", (3, "self_attn.q_proj")),
        ("bert.encoder.layer.5.attention.self.query", (5, "attention.self.query")),
        ("transformer.h.11.mlp.c_fc", (11, "mlp.c_fc")),
        ("model.layers.2.block_sparse_moe.experts.7.w1", (2, "block_sparse_moe.experts.7.w1")),
        ("lm_head", (None, "lm_head")),
        ("classifier.dense", (None, "classifier.dense")),
        ("classifier.0", (None, "classifier.0")),
    ],
)
def test_split_block_and_type(name: str, expected: tuple[int | None, str]) -> None:
    assert split_block_and_type(name) == expected


def _check_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100


def test_plot_llama(tmp_path: Path) -> None:
    out = make_plan().plot(tmp_path / "ranks.png")
    assert out == tmp_path / "ranks.png"
    _check_png(out)
    assert os.listdir(tmp_path) == ["ranks.png"]


def test_plot_non_block_names_and_collisions(tmp_path: Path) -> None:
    names = ["lm_head", "classifier.dense", "model.encoder.layers.0.fc1", "model.decoder.layers.0.fc1"]
    _check_png(make_plan(names=names).plot(tmp_path / "other.png", title="custom"))


def test_heatmap_grid_layout() -> None:
    from fimlora.plan_render import _heatmap_grid

    names = ["model.layers.1.q", "model.layers.0.q", "model.layers.0.k", "lm_head"]
    rows, cols, grid = _heatmap_grid(make_plan(names=names, ranks=[1, 2, 3, 4]).layers)
    assert rows == ["0", "1", "-"] and cols == ["q", "k", "lm_head"]
    assert grid[0][:2] == [2.0, 3.0] and grid[1][0] == 1.0 and grid[2][2] == 4.0
    assert all(x != x for x in (grid[1][1], grid[0][2]))  # NaN marks missing combinations

    names = ["model.encoder.layers.0.fc1", "model.decoder.layers.0.fc1"]
    _, cols, _ = _heatmap_grid(make_plan(names=names, ranks=[1, 2]).layers)
    assert cols == ["encoder/fc1", "decoder/fc1"]


def test_plot_handles_200_layers(tmp_path: Path) -> None:
    names = [f"model.layers.{b}.{t}" for b in range(29) for t in LLAMA_TYPES][:200]
    out = make_plan(names=names).plot(tmp_path / "big.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- format versions ----------------------------------------------------------

FORMAT_1 = Path(__file__).parent / "data" / "plan_format_1.json"  # the embedded demo's plan, as format 1 wrote it


def test_a_format_1_plan_loads_migrated() -> None:
    raw = json.loads(FORMAT_1.read_text())
    assert raw["format_version"] == 1 and raw["calibration"]["backend"] == "cuda"
    plan = RankPlan.load(FORMAT_1)
    assert plan.format_version == PLAN_FORMAT_VERSION == 3
    # the allocation settings leave the calibration record for the typed allocation
    assert plan.allocation == AllocationConfig(budget=Budget.mean_rank(8), r_min=4, r_max=16, multiple_of=1,
                                               temperature=1.0, alpha_policy="fixed_scale", score="variance",
                                               if_uncertain="allocate")  # format-1 plans were allocated
    assert not {"r_min", "r_max", "multiple_of", "temperature", "score"} & set(plan.calibration)
    assert plan.calibration["backend"] == "compiled"  # the compiled backend's new name
    assert plan.budget_total == raw["budget"]["total"] and plan.budget_used == raw["budget"]["used"]
    assert [(lp.name, lp.rank, lp.alpha, lp.score, lp.stats) for lp in plan.layers] == [
        (d["name"], d["rank"], d["alpha"], d["score"], d["stats"]) for d in raw["layers"]]
    assert {k: v for k, v in plan.calibration.items() if k != "backend"} == {
        k: v for k, v in raw["calibration"].items()
        if k not in ("backend", "r_min", "r_max", "multiple_of", "temperature", "score")}


def test_a_migrated_plan_saves_in_the_current_format(tmp_path: Path) -> None:
    plan = RankPlan.load(FORMAT_1)
    saved = json.loads(plan.save(tmp_path / "plan.json").read_text())
    assert saved["format_version"] == 3 and saved["allocation"]["r_min"] == 4
    assert RankPlan.load(tmp_path / "plan.json") == plan


def test_a_format_1_plan_without_allocation_keys_gets_the_defaults() -> None:
    raw = json.loads(FORMAT_1.read_text())
    for key in ("r_min", "r_max", "multiple_of", "temperature", "score"):
        del raw["calibration"][key]
    plan = RankPlan.from_dict(raw)
    assert (plan.allocation.r_min, plan.allocation.r_max, plan.allocation.score) == (4, 16, "variance")


def _fresh_modules(code: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
                          capture_output=True, text=True, timeout=120, check=True)
    return set(done.stdout.split())


def test_reading_a_plan_needs_no_torch() -> None:
    loaded = _fresh_modules(f"import fimlora.plan\nfimlora.plan.RankPlan.load({str(FORMAT_1)!r}).table()")
    assert "fimlora.plan" in loaded
    assert not {"torch", "transformers", "peft"} & loaded

"""The quality study's pieces (benchmarks/quality/): statistics against scipy and brute force,
the control methods' invariants, and an end-to-end --smoke run with its report."""

from __future__ import annotations

import csv
import math
import random
import sys
from pathlib import Path

import pytest

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
sys.path.insert(0, str(QUALITY))
scipy_stats = pytest.importorskip("scipy.stats")

import analysis  # noqa: E402
import methods  # noqa: E402
from tasks import glue_tasks, load_task, metric_parts, task_score, validation_size  # noqa: E402

# MiniLM's 36 target layers: 6 blocks x (q, k, v, attention out: 384x384; MLP up 384->1536; down 1536->384).
KINDS = {"attention.self.query": (384, 384), "attention.self.key": (384, 384), "attention.self.value": (384, 384),
         "attention.output.dense": (384, 384), "intermediate.dense": (384, 1536), "output.dense": (1536, 384)}
SHAPES = {f"bert.encoder.layer.{b}.{k}": s for b in range(6) for k, s in KINDS.items()}


def test_paired_t_interval_matches_scipy():
    rng = random.Random(0)
    diffs = [rng.gauss(0.3, 1.0) for _ in range(9)]
    mean, sd, lo, hi, p = analysis.t_interval(diffs)
    ref = scipy_stats.ttest_1samp(diffs, 0.0)
    ci = ref.confidence_interval(0.95)
    assert p == pytest.approx(ref.pvalue, rel=1e-9)
    assert (lo, hi) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_holm_matches_the_step_down_definition():
    rng = random.Random(1)
    for _ in range(50):
        p = [rng.random() ** 3 for _ in range(rng.randint(1, 6))]
        m = len(p)
        order = sorted(range(m), key=lambda i: p[i])
        expected = [0.0] * m
        for k, i in enumerate(order):  # adjusted p_(k) = max_{j<=k} min(1, (m - j) p_(j))
            expected[i] = max(min(1.0, (m - j) * p[order[j]]) for j in range(k + 1))
        assert analysis.holm(p) == pytest.approx(expected)


def test_mde_is_the_effect_detected_with_80_percent_power():
    sd, n = 0.54, 12
    mde = analysis.minimum_detectable_effect(sd, n)
    # Power of the two-sided paired t test at that effect, from the noncentral t distribution.
    df, crit = n - 1, scipy_stats.t.ppf(0.975, n - 1)
    nc = mde / (sd / math.sqrt(n))
    power = scipy_stats.nct.sf(crit, df, nc) + scipy_stats.nct.cdf(-crit, df, nc)
    assert power == pytest.approx(0.8, abs=0.02)


def test_power_and_seeds_needed_match_a_simulated_paired_t_test():
    # Independent reference: simulate paired differences and count how often the t test rejects.
    rng = random.Random(5)
    effect, sd = 0.5, 0.54
    n = analysis.seeds_needed(effect, sd)
    def simulated_power(pairs, trials=3000):
        hits = 0
        for _ in range(trials):
            d = [rng.gauss(effect, sd) for _ in range(pairs)]
            hits += analysis.t_interval(d)[4] < 0.05
        return hits / trials
    for pairs in (n - 1, n, 2 * n):
        assert analysis.paired_power(effect, sd, pairs) == pytest.approx(simulated_power(pairs), abs=0.03)
    assert analysis.paired_power(effect, sd, n - 1) < 0.8 <= analysis.paired_power(effect, sd, n)
    assert analysis.seeds_needed(effect, 0.0) is None


def test_bootstrap_interval_contains_the_observed_difference_and_shrinks_with_more_examples():
    rng = random.Random(2)
    def pair(n):
        gold = [rng.randint(0, 1) for _ in range(n)]
        better = [g if rng.random() < 0.9 else 1 - g for g in gold]
        worse = [g if rng.random() < 0.8 else 1 - g for g in gold]
        return better, worse, gold, lambda p, g: task_score("accuracy", p, g)
    small = [pair(100) for _ in range(3)]
    large = [pair(1000) for _ in range(3)]
    observed = sum(s(a, g) - s(b, g) for a, b, g, s in small) / 3
    lo, hi = analysis.paired_bootstrap(small, resamples=300)
    assert lo <= observed <= hi
    lo_l, hi_l = analysis.paired_bootstrap(large, resamples=300)
    assert hi_l - lo_l < hi - lo


def test_metric_parts_against_brute_force_definitions():
    rng = random.Random(3)
    pred = [rng.randint(0, 1) for _ in range(200)]
    gold = [rng.randint(0, 1) for _ in range(200)]
    parts = metric_parts(pred, gold)
    x, y = [float(p) for p in pred], [float(g) for g in gold]
    assert parts["mcc"] == pytest.approx(scipy_stats.pearsonr(x, y).statistic)  # MCC = phi = Pearson on 0/1
    assert parts["accuracy"] == sum(p == g for p, g in zip(pred, gold, strict=True)) / 200
    assert task_score("f1_accuracy", pred, gold) == pytest.approx(50 * (parts["accuracy"] + parts["f1"]))


def test_prior_recovers_an_additive_block_plus_type_map():
    block_effect = [0.0, 0.5, -0.3, 1.2, 0.1, -0.8]
    type_effect = dict(zip(KINDS, [0.0, 0.4, 1.1, -0.2, 2.0, 0.7], strict=True))
    truth = {n: math.exp(block_effect[int(n.split(".")[3])] + type_effect[n.split(".", 4)[4]]) for n in SHAPES}
    noisy = [{n: v * math.exp(random.Random(i).gauss(0, 0.01)) for n, v in truth.items()} for i in range(2)]
    prior = methods.prior_scores(noisy, list(SHAPES))
    for name in SHAPES:
        assert prior[name] == pytest.approx(truth[name], rel=0.03)


def test_shuffled_keeps_each_module_types_ranks_and_the_cost():
    rng = random.Random(4)
    scores = {n: rng.random() ** 4 for n in SHAPES}
    ranks = methods.allocate_map(scores, SHAPES, methods.BUDGETS["r8"])
    shuffled = methods.shuffled_within_type(ranks, seed=0)
    assert shuffled != ranks
    for kind in KINDS:
        of_kind = [n for n in SHAPES if n.split(".", 4)[4] == kind]
        assert sorted(shuffled[n] for n in of_kind) == sorted(ranks[n] for n in of_kind)
    assert methods.lora_params(shuffled, SHAPES) == methods.lora_params(ranks, SHAPES)


@pytest.mark.parametrize("method", methods.SCORING)
@pytest.mark.parametrize("budget", list(methods.BUDGETS))
def test_every_scoring_variant_spends_uniforms_budget_within_one_percent(method, budget):
    rng = random.Random(5)
    scores = {n: rng.lognormvariate(0, 2) for n in SHAPES}
    ranks = methods.variant_ranks(method, scores, SHAPES, methods.BUDGETS[budget])
    uniform = methods.lora_params({n: methods.BUDGETS[budget].rank for n in SHAPES}, SHAPES)
    assert 0.99 * uniform <= methods.lora_params(ranks, SHAPES) <= uniform


def test_glue_splits_are_fixed_disjoint_and_read_with_the_library(shared_dir):
    table = glue_tasks(shared_dir / "data")
    for name, spec in table.items():
        data = load_task(spec)
        train_rows = len(data.fit) + len(data.val)
        assert len(data.val) == validation_size(train_rows)
        fit = set(zip(data.fit.texts, data.fit.text_pairs or [None] * len(data.fit), strict=True))
        val = list(zip(data.val.texts, data.val.text_pairs or [None] * len(data.val), strict=True))
        # Duplicated sentences exist in GLUE train files; nearly all of val must be unseen rows.
        assert sum(v in fit for v in val) < 0.05 * len(val), name
        assert len(data.label_names) == 2
        assert data.fit.texts == load_task(spec).fit.texts  # the split depends on no run-time seed


def test_smoke_run_resumes_and_reports(tmp_path, shared_dir, minilm_dir):
    import report
    import run

    results = tmp_path / "runs.csv"
    args = ["--split", "dev", "--methods", "uniform,fim-variance,fim-shuffled,prior,fim-warm,fim-transfer",
            "--tasks", "sst2,cola", "--seeds", "0", "--smoke", "--results", str(results),
            "--data-dir", str(shared_dir / "data")]
    run.main(args)
    smoke = tmp_path / "smoke_runs.csv"
    with smoke.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    for row in rows:
        assert abs(int(row["lora_params"]) / int(row["uniform_params"]) - 1) <= 0.01
        assert int(row["trainable_lora"]) == int(row["lora_params"])  # the map is what PEFT built
    run.main(args)  # resume: nothing left to do
    with smoke.open() as handle:
        assert len(list(csv.DictReader(handle))) == 12
    readme = tmp_path / "README.md"
    readme.write_text("# Study\n\n<!-- report.py: val -->\n<!-- /report.py -->\n\n<!-- report.py: dev -->\nold\n"
                      "<!-- /report.py -->\n")
    report.main(["--results", str(smoke), "--data-dir", str(shared_dir / "data"), "--bootstrap", "20",
                 "--readme", str(readme)])
    tables = (tmp_path / "tables.md").read_text()
    assert "fim-warm" in tables and "pooled" in tables
    assert "seeds for 0.5 points" in tables and "another task (same seed)" in tables
    filled = readme.read_text()
    assert "old" not in filled and "### Dev sets, budget r8: power (fim-variance minus uniform)" in filled
    # the README's dev block is tables.md's dev part, headings one level down
    dev_part = tables[tables.index("## Dev sets"):].strip()
    block = filled.split("<!-- report.py: dev -->\n")[1].split("\n<!-- /report.py -->")[0]
    assert block == "\n".join("#" + ln if ln.startswith("#") else ln for ln in dev_part.splitlines())


def test_fill_readme_rewrites_only_its_blocks_and_names_a_missing_one(tmp_path):
    import report

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- report.py: dev -->\nstale 1.23\n<!-- /report.py -->\noutro\n")
    report.fill_readme(readme, {"dev": ["## Scores", "", "| a |"]})
    assert readme.read_text() == "intro\n<!-- report.py: dev -->\n### Scores\n\n| a |\n<!-- /report.py -->\noutro\n"
    with pytest.raises(SystemExit, match=r"found \['dev'\]"):
        report.fill_readme(readme, {"dev": ["x"], "val": ["y"]})
    assert "### Scores" in readme.read_text()  # a refused rewrite leaves the file as it was


def test_map_agreement_is_spearman_of_the_rank_maps():
    import report
    from scipy.stats import spearmanr

    rng = random.Random(3)
    base = [rng.randint(4, 16) for _ in range(36)]
    noisy = [r + rng.choice((-1, 0, 1)) for r in base]
    def row(task, method, seed, ranks):
        return {"split": "dev", "bf16": "True", "task": task, "method": method, "budget": "r8", "seed": str(seed),
                "ranks": " ".join(map(str, ranks)), "score": "80"}
    rows = [row("sst2", "fim-variance", 0, base), row("sst2", "fim-variance", 1, noisy),
            row("sst2", "prior", 0, base[::-1]), row("cola", "fim-variance", 0, noisy)]
    table = "\n".join(report.map_agreement(report.Grid(rows, "dev"), "r8"))
    seed_rho = spearmanr(base, noisy)[0]
    assert f"| fim-variance, another seed (same task) | 1 | {seed_rho:.2f} " in table
    assert f"| fim-variance, another task (same seed) | 1 | {seed_rho:.2f} " in table
    assert f"| prior (same task and seed) | 1 | {spearmanr(base, base[::-1])[0]:.2f} " in table
    assert "fim-warm" not in table


def test_verdicts_smoke_writes_one_row_per_task_seed_and_batch_count(tmp_path, shared_dir, minilm_dir):
    import verdicts

    out = tmp_path / "verdicts.csv"
    verdicts.main(["--tasks", "sst2", "--seeds", "0", "--smoke", "--out", str(out),
                   "--data-dir", str(shared_dir / "data")])
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["num_batches"], r["batches_used"]) for r in rows][0] == ("2", "2")
    assert rows[1]["num_batches"] == "auto" and 2 <= int(rows[1]["batches_used"]) <= 3
    assert {r["verdict"] for r in rows} <= {"stable", "unstable", "flat"}
    assert all(int(r["samples"]) == 32 * int(r["batches_used"]) for r in rows)


def test_verdict_table_counts_each_tasks_verdicts_and_actions(tmp_path):
    import report

    path = tmp_path / "verdicts.csv"
    fields = ("task", "seed", "num_batches", "batches_used", "samples", "verdict", "unstable_share",
              "expected_rank_change", "flat_p", "action", "seconds")
    rows = [("sst2", 0, "auto", 3, 96, "stable", 0.1, 0.2, 0, "allocated", 1),
            ("sst2", 1, "auto", 5, 160, "unstable", 0.3, 0.4, 0, "uniform", 1)]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        writer.writerows(rows)
    table = report.verdict_table(path)
    assert table[2] == "| sst2 | auto | 2 | 3-5 | stable 1, unstable 1 | allocated 1, uniform 1 | 20%, 30% | 0.30 |"
    assert report.verdict_table(tmp_path / "absent.csv") == []

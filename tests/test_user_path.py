"""From calibration to a reloadable adapter, the way a PEFT/transformers user goes (issue 13):
each test reproduces one friction met with the command line or get_peft_model, checked against
what PEFT and transformers themselves do."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from models import random_samples, tiny_bert, tiny_llama
from peft import (
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    LoraConfig,
    PeftModel,
    PeftModelForSequenceClassification,
)

import fimlora
from fimlora.cli import main
from fimlora.plan import RankPlan

FAST = ["--num-batches", "2", "--batch-size", "4", "--rank", "4", "--quiet"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, minilm_dir):
    """A tiny bare BERT encoder (no head: the CLI adds a fresh one) with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    directory = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, minilm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    directory = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_llama(vocab_size=tokenizer.vocab_size, max_position_embeddings=48).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.write_text("\n".join("\t".join(map(str, row)) for row in [header, *rows]) + "\n")
    return path


def _scores(tmp_path):  # an STS-B-like regression file: a 0-5 similarity score per pair
    rows = [[f"a man plays {i} songs", f"someone plays music {i % 5}", round(i * 0.37 % 5, 2)] for i in range(24)]
    return _tsv(tmp_path / "sts.tsv", ["sentence1", "sentence2", "score"], rows)


def _inputs():
    return {"input_ids": torch.tensor([[101, 2000, 2001, 2002, 102]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}


# 1. the head the adapter was built with is recorded, and the obvious loads work
@pytest.mark.parametrize("kind", ["regression", "strings"])
def test_adapter_records_its_head_and_reloads(kind, bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    if kind == "regression":
        data, extra = _scores(tmp_path), ["--label-column", "score"]
    else:
        rows = [[f"text {i}", ["entailment", "neutral", "contradiction"][i % 3]] for i in range(24)]
        data, extra = _tsv(tmp_path / "nli.tsv", ["sentence", "label"], rows), []
    out = tmp_path / "run"
    assert main(["calibrate", "--model", str(bert_dir), "--data", str(data), "--out", str(out), *FAST, *extra]) == 0
    plan = RankPlan.load(out / "fimlora_plan.json")
    head = plan.calibration["head"]
    if kind == "regression":
        assert head["num_labels"] == 1 and head["problem_type"] == "regression"
    else:
        assert head["id2label"] == {"0": "contradiction", "1": "entailment", "2": "neutral"}
    # without the recorded head, PEFT's own load of the default 2-class base fails (the friction)
    if kind == "regression":
        with pytest.raises(RuntimeError, match="size mismatch"):
            PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(bert_dir), out)
    auto = AutoPeftModelForSequenceClassification.from_pretrained(out)  # no arguments
    kwargs = fimlora.base_model_kwargs(out)
    explicit = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(bert_dir, **kwargs), out)
    for model in (auto, explicit):
        config = model.config
        assert config.num_labels == head["num_labels"] and config.problem_type == head["problem_type"]
        assert {str(i): label for i, label in config.id2label.items()} == head["id2label"]
    torch.testing.assert_close(auto.eval()(**_inputs()).logits, explicit.eval()(**_inputs()).logits, rtol=0, atol=0)


# 2. a base of the wrong class is refused, where PEFT silently loads a uniform-rank adapter
def test_load_adapter_refuses_the_wrong_base_class(bert_dir, tmp_path):
    from transformers import AutoModel, AutoModelForSequenceClassification

    out = tmp_path / "run"
    # --if-uncertain allocate: 8 samples cannot support a map, but this test needs non-uniform ranks
    assert main(["calibrate", "--model", str(bert_dir), "--data", str(_scores(tmp_path)), "--label-column", "score",
                 "--out", str(out), "--if-uncertain", "allocate", *FAST]) == 0
    plan = RankPlan.load(out / "fimlora_plan.json")
    assert plan.calibration["model_class"] == "BertForSequenceClassification"
    assert plan.calibration["auto_class"] == "AutoModelForSequenceClassification"
    assert len(set(plan.ranks.values())) > 1
    try:  # what PEFT does: a load that cannot carry the plan (no anchored key matches a BertModel's names)
        wrong = PeftModel.from_pretrained(AutoModel.from_pretrained(bert_dir), out)
    except ValueError:
        pass  # this PEFT finds none of the full names; others matched by suffix and gave uniform ranks
    else:
        assert len({module.r["default"] for module in wrong.modules() if hasattr(module, "lora_A")}) <= 1
    with pytest.raises(fimlora.PlanMismatchError) as error:
        fimlora.load_adapter(AutoModel.from_pretrained(bert_dir), out)
    message = str(error.value)
    assert "\n" not in message and "BertModel" in message and "AutoModelForSequenceClassification" in message
    assert "num_labels=1" in message
    with pytest.raises(fimlora.PlanMismatchError, match="num_labels=1"):  # right class, wrong head
        fimlora.check_adapter(AutoModelForSequenceClassification.from_pretrained(bert_dir), out)
    loaded = fimlora.load_adapter(AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=1), out)
    ranks = {name.removeprefix("base_model.model."): module.r["default"]
             for name, module in loaded.named_modules() if hasattr(module, "lora_A")}
    assert ranks == {name: r for name, r in plan.ranks.items() if r > 0}


# 3. a relative --model is stored resolved, so the adapter reloads from another directory
def test_relative_model_path_reloads_from_elsewhere(llama_dir, tmp_path, monkeypatch):
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"line {i} about cats and dogs" for i in range(20)))
    monkeypatch.chdir(llama_dir.parent)
    assert main(["calibrate", "--model", "./tiny-llama", "--data", str(text), "--out", str(tmp_path / "run"), *FAST]) == 0
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(llama_dir.resolve())
    monkeypatch.chdir(tmp_path)
    assert type(AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run")).__name__ == "PeftModelForCausalLM"
    # the Python route too: the model's typed path is resolved in what save_pretrained writes; hub ids stay ids
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(llama_dir.parent)
    model = AutoModelForCausalLM.from_pretrained("./tiny-llama")
    batches = [{"input_ids": torch.randint(1, 99, (4, 8))} for _ in range(2)]
    peft_model = fimlora.get_peft_model(model, batches, LoraConfig(r=4, target_modules="all-linear"), num_batches=2)
    assert peft_model.peft_config["default"].base_model_name_or_path == str(llama_dir.resolve())
    from fimlora.modelinfo import resolved_name_or_path

    assert resolved_name_or_path("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"


# 4. get_peft_model on a classifier: task_type from the calibration, a trainable head, contradictions refused
def test_get_peft_model_sets_the_task_and_trains_the_head():
    samples = random_samples(16, num_labels=3)
    batches = [{"input_ids": torch.stack([s[0][:3] for s in samples[i:i + 4]]),
                "labels": torch.stack([s[1] for s in samples[i:i + 4]])} for i in range(0, 16, 4)]
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    peft_model = fimlora.get_peft_model(tiny_bert(), batches, config, num_batches=4)
    assert isinstance(peft_model, PeftModelForSequenceClassification)
    assert peft_model.peft_config["default"].task_type == "SEQ_CLS"
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any("classifier" in name for name in trainable) and any("lora_B" in name for name in trainable)
    assert config.task_type is None  # the caller's config is not changed
    with pytest.raises(fimlora.PlanMismatchError, match="task_type='CAUSAL_LM'.*seq-cls.*SEQ_CLS"):
        fimlora.get_peft_model(tiny_bert(), batches, LoraConfig(r=8, task_type="CAUSAL_LM"), num_batches=4,
                               backend="no-such-backend")  # refused before the backend is even looked at
    # the user's own modules_to_save wins
    kept = fimlora.get_peft_model(tiny_bert(), batches, LoraConfig(r=8, modules_to_save=[]), num_batches=4)
    assert kept.peft_config["default"].modules_to_save == ["classifier", "score"]  # PEFT's own SEQ_CLS defaults


# 5. which columns were used is said before the work and recorded; a column that would be ignored is refused
def test_calibrating_on_summary_and_ignored_columns(bert_dir, llama_dir, tmp_path, capsys):
    rows = [[f"what is {i}?", f"{i} is a number", ["entailment", "not_entailment"][i % 2], i] for i in range(24)]
    qnli = _tsv(tmp_path / "qnli.tsv", ["question", "sentence", "label", "idx"], rows)
    out = tmp_path / "run"
    args = ["calibrate", "--model", str(bert_dir), "--data", str(qnli), "--out", str(out), *FAST[:-1]]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "fimlora: calibrating on" in err and "columns: text=sentence, label=label; unused: question, idx" in err
    assert "0=entailment, 1=not_entailment" in err and "8 of 24 rows, shuffled (seed 0)" in err
    calibration = RankPlan.load(out / "fimlora_plan.json").calibration
    assert calibration["columns"] == {"text": "sentence", "text_pair": None, "label": "label",
                                      "unused": ["question", "idx"]}
    jsonl = tmp_path / "pc.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(8)))
    code = main(["calibrate", "--model", str(llama_dir), "--data", str(jsonl), "--text-column", "prompt",
                 "--target-column", "completion", "--out", str(tmp_path / "pc")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "--target-column completion would be ignored" in err[0]
    assert "--prompt-column and --completion-column" in err[0] and not (tmp_path / "pc").exists()


# 7. a seeded shuffle by default, --no-shuffle for the first rows, the rows used recorded
def test_rows_are_drawn_shuffled_by_default_and_recorded(llama_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"{'first genre' if i < 8 else 'second kind'} sentence {i}" for i in range(40)))

    def rows(*extra):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        assert main(["calibrate", "--model", str(llama_dir), "--data", str(text), "--out", str(out), *FAST, *extra]) == 0
        return RankPlan.load(out / "fimlora_plan.json").calibration["rows"]

    shuffled, again, first = rows(), rows(), rows("--no-shuffle")
    assert shuffled["shuffled"] and shuffled["count"] == 8 and shuffled["of"] == 40
    assert shuffled["fingerprint"] == again["fingerprint"] != first["fingerprint"]
    assert not first["shuffled"]
    import hashlib

    expected = hashlib.sha256()
    for i in range(8):
        expected.update(json.dumps([f"first genre sentence {i}", None, None]).encode() + b"\n")
    assert first["fingerprint"] == "sha256:" + expected.hexdigest()
    # get_peft_model given tokenised examples draws them the same way and records them
    examples = [{"input_ids": torch.full((4,), i + 1)} for i in range(40)]
    plan = fimlora.plan_model(tiny_llama(), examples, LoraConfig(r=4), batch_size=4, num_batches=2)
    assert plan.calibration["rows"]["shuffled"] and plan.calibration["rows"]["count"] == 8
    plain = fimlora.plan_model(tiny_llama(), examples, LoraConfig(r=4), batch_size=4, num_batches=2, shuffle=False)
    assert plain.calibration["rows"]["fingerprint"] != plan.calibration["rows"]["fingerprint"]


# 8. budgets the clamps keep from shaping the ranks warn, naming the clamp and the fix
@pytest.mark.parametrize(("budget", "spent"), [("16", "100%"), ("40", "40%")])
def test_unreachable_budget_warns(budget, spent, llama_dir, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"line {i}" for i in range(20)))
    args = ["calibrate", "--model", str(llama_dir), "--data", str(text), "--out", str(tmp_path / "r"), "--budget", budget,
            "--num-batches", "2", "--batch-size", "4", "--quiet"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "fimlora: warning: the budget cannot be allocated by score: r_max=16 caps every layer" in err
    assert f"spends {spent} of the budget" in err and "--r-max" in err
    with pytest.warns(UserWarning, match="r_max=16 caps every layer"):
        fimlora.plan_model(tiny_llama(), [{"input_ids": torch.randint(1, 90, (4, 6))}], LoraConfig(r=8),
                           allocation=fimlora.AllocationConfig(budget=fimlora.Budget.parse(budget)), num_batches=1)
    with pytest.raises(ValueError, match="pays for no rank"):
        fimlora.AllocationConfig(budget=fimlora.Budget.total_rank(1), r_min=0, multiple_of=4).resolved(8).unreachable(
            [(32, 32)] * 3)


# 9. the command line: help, -v anywhere, --version, training settings, file modes, quiet third parties
def test_cli_help_version_and_verbose(capsys):
    assert main(["calibrate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for option, default in [("--num-batches", "8"), ("--batch-size", "8"), ("--max-length", "128"),
                            ("--dtype", "float32"), ("--seed", "0"), ("--lora-dropout", "0.0")]:
        assert f"(default: {default})" in text.split(option.upper().lstrip("-").replace("-", "_"), 1)[-1], option
    for option in ("--text-column", "--label-column", "--score", "--granularity", "--backend"):
        assert text.split(option, 2)[-1].split("--")[0].strip().split(" ", 1)[-1], option
    assert "--rank 16" in text and "--budget 16 with --rank 8" in text
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"fimlora {fimlora.__version__}"
    from fimlora.cli.parser import build_parser

    assert build_parser().parse_args(["env", "-v"]).verbose and build_parser().parse_args(["-v", "env"]).verbose
    assert not build_parser().parse_args(["env"]).verbose


def test_cli_writes_a_trainable_adapter_with_ordinary_modes(llama_dir, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"line {i}" for i in range(20)))
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert main(["calibrate", "--model", str(llama_dir), "--data", str(text), "--out", str(out),
                     "--lora-dropout", "0.1", *FAST]) == 0
    finally:
        os.umask(old)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.1 and config["inference_mode"] is False and config["task_type"] == "CAUSAL_LM"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        name: 0o644 for name in ("README.md", "adapter_config.json", "adapter_model.safetensors", "fimlora_plan.json",
                                 "rank_map.png")}
    assert "README.md, adapter_config.json" in capsys.readouterr().out
    trained = PeftModel.from_pretrained(tiny_llama(vocab_size=config_vocab(llama_dir), max_position_embeddings=48), out,
                                        is_trainable=True)
    assert any(p.requires_grad for p in trained.parameters())


def config_vocab(model_dir) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


def test_cli_prints_no_third_party_noise(llama_dir, tmp_path):
    """transformers' FutureWarnings and bitsandbytes' kernel probe ("Failed to load CPU gemm_4bit_forward
    from kernels-community") are not the user's business; fimlora's own lines keep their prefix."""
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"line {i}" for i in range(20)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": ""}
    run = subprocess.run([sys.executable, "-m", "fimlora.cli", "calibrate", "--model", str(llama_dir), "--data",
                          str(text), "--out", str(tmp_path / "r"), "--budget", "16", *FAST],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "FutureWarning" not in run.stderr and "kernels" not in run.stderr and "warnings.warn" not in run.stderr
    assert [line for line in run.stderr.splitlines() if line.strip()] == [
        line for line in run.stderr.splitlines() if line.startswith("fimlora: ")]
    assert "fimlora: warning: the budget cannot be allocated" in run.stderr


def test_cli_log_handler_formats_only_fimlora_records(capsys, monkeypatch):
    import logging

    from fimlora.cli import commands

    def noisy(args):
        logging.getLogger("bitsandbytes.cextension").warning("Failed to load CPU gemm_4bit_forward")
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
        logging.getLogger("fimlora").warning("own message")
        return 0

    monkeypatch.setitem(commands.COMMANDS, "env", noisy)
    assert main(["env"]) == 0
    assert capsys.readouterr().err == "fimlora: own message\n"
    assert main(["env", "-v"]) == 0
    err = capsys.readouterr().err
    assert "bitsandbytes.cextension: WARNING: Failed to load" in err and "fimlora: Failed" not in err


def test_env_prints_the_embedded_model_path(minilm_dir, capsys):
    assert main(["env"]) == 0
    assert f"default model: {minilm_dir}" in capsys.readouterr().out

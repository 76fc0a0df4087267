"""The command line, end to end: outputs load with vanilla PEFT; failures leave nothing behind."""

from __future__ import annotations

import json
from importlib import metadata

import pytest
import torch
from conftest import require
from models import tiny_llama
from peft import PeftModel

from fimlora.cli import main
from fimlora.plan import RankPlan

OUTPUTS = {"adapter_config.json", "adapter_model.safetensors", "fimlora_plan.json", "rank_map.png"}


def _save_tiny_llama(tmp_path_factory, request, **sizes):
    """A tiny Llama saved as a local model directory, with the embedded BERT tokenizer's vocabulary."""
    from transformers import AutoTokenizer

    minilm = request.getfixturevalue("minilm_dir")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab_size=tokenizer.vocab_size, max_position_embeddings=48, **sizes).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, request):
    return _save_tiny_llama(tmp_path_factory, request)


@pytest.fixture(scope="module")
def quantizable_model_dir(tmp_path_factory, request):
    """Wide enough for bitsandbytes' 4-bit CPU kernels (they tile features by 64)."""
    return _save_tiny_llama(tmp_path_factory, request, hidden_size=64, intermediate_size=128)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(f"sentence number {i} is about {'cats' if i % 2 else 'dogs'} and more" for i in range(40)))
    return path


def test_tiny_causal_lm_end_to_end(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["calibrate", "--model", str(tiny_model_dir), "--data", str(text_file), "--out", str(out),
                 "--num-batches", "3", "--batch-size", "4", "--rank", "4", "--quiet"])
    assert code == 0
    assert OUTPUTS <= {p.name for p in out.iterdir()}  # PEFT adds its README.md model card
    plan = RankPlan.load(out / "fimlora_plan.json")
    assert plan.calibration["task"] == "causal-lm" and plan.calibration["samples"] == 12
    assert plan.budget_used <= plan.budget_total
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"^" + name.replace(".", r"\."): r for name, r in plan.ranks.items() if r > 0}
    loaded = PeftModel.from_pretrained(tiny_llama(vocab_size=plan_vocab(tiny_model_dir), max_position_embeddings=48), out)
    assert loaded(input_ids=torch.tensor([[5, 6, 7]])).logits.shape[-1] == plan_vocab(tiny_model_dir)
    assert "calibrated 14 layers on 12 samples" in capsys.readouterr().out


def plan_vocab(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def test_default_embedded_model(tmp_path, minilm_dir, capsys):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "demo"
    assert main(["calibrate", "--out", str(out)]) == 0
    assert OUTPUTS <= {p.name for p in out.iterdir()}  # PEFT adds its README.md model card
    printed = capsys.readouterr().out
    assert "bert.encoder.layer.5.attention.self.value" in printed and "alpha policy fixed_scale" in printed
    plan = RankPlan.load(out / "fimlora_plan.json")
    assert len(plan.layers) == 37 and plan.calibration["samples"] == 64
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    loaded = PeftModel.from_pretrained(base, out)
    ranks = {n: m.r["default"] for n, m in loaded.base_model.model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "r")}
    assert ranks == plan.ranks

    assert main(["show", str(out / "fimlora_plan.json"), "--plot", str(tmp_path / "again.png")]) == 0
    shown = capsys.readouterr().out
    assert "bert.pooler.dense" in shown and (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"


def _fails(args, capsys, message):
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fimlora: error:") and message in err, err
    return err


def test_missing_data_file_fails_before_work(tmp_path, capsys):
    out = tmp_path / "never"
    _fails(["calibrate", "--data", str(tmp_path / "nope.txt"), "--out", str(out)], capsys, "does not exist")
    assert not out.exists()


def test_unknown_column(tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\nhello there,1\n")
    _fails(["calibrate", "--data", str(data), "--text-column", "txt", "--out", str(tmp_path / "o")], capsys, "txt")


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(["calibrate", "--out", str(out)], capsys, "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_infeasible_budget_leaves_no_output(tmp_path, capsys, minilm_dir):
    out = tmp_path / "o"
    _fails(["calibrate", "--out", str(out), "--budget", "rank:10", "--r-min", "2", "--num-batches", "1"], capsys, "budget")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_r_min_above_r_max(tmp_path, capsys, monkeypatch):
    _no_model_loaded(monkeypatch)
    _fails(["calibrate", "--out", str(tmp_path / "o"), "--r-min", "9", "--r-max", "4", "--num-batches", "1"], capsys, "r_min")


def test_failure_while_writing_leaves_no_partial_directory(tmp_path, capsys, minilm_dir, monkeypatch):
    from fimlora import plan as plan_module

    def broken_plot(self, path, title=None):
        raise OSError("disk full")

    monkeypatch.setattr(plan_module.RankPlan, "plot", broken_plot)
    out = tmp_path / "runs" / "x" / "o"  # the directories made for it go too
    _fails(["calibrate", "--out", str(out), "--num-batches", "1"], capsys, "disk full")
    assert not list(tmp_path.iterdir()), "no output and no temporary directory may remain"


def _no_model_loaded(monkeypatch):
    """Make loading any model fail the test: the checks under test must come first."""
    from fimlora import modelio

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(modelio, "load_model_and_tokenizer", never)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-batches", "0"], "argument --num-batches: must be a positive integer or 'auto', got '0'"),
        (["--batch-size", "-1"], "argument --batch-size: must be a positive integer, got '-1'"),
        (["--rank", "0"], "argument --rank: must be a positive integer, got '0'"),
        (["--alpha", "-8"], "argument --alpha: must be a finite number > 0"),
        (["--alpha", "nan"], "argument --alpha: must be a finite number > 0"),
        (["--alpha", "0"], "argument --alpha: must be a finite number > 0 (alpha 0 gives an adapter that does nothing)"),
        (["--targets", "re:(["], "argument --targets: targets regex '([' is not a valid regular expression"),
        (["--backend", "cuda-magic"], "argument --backend: invalid choice: 'cuda-magic'"),
        (["--budget", "ranks:9"], "argument --budget: cannot parse budget 'ranks:9'"),
        (["--temperature", "-1"], "argument --temperature: must be a finite number >= 0"),
    ],
)
def test_bad_arguments_exit_1_with_one_line_before_any_work(args, message, tmp_path, capsys, monkeypatch):
    _no_model_loaded(monkeypatch)
    out = tmp_path / "runs" / "x" / "y" / "out"
    assert main(["calibrate", "--out", str(out), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fimlora: error:") and message in err[0], err
    assert not list(tmp_path.iterdir()), "nothing may be created"


def test_bad_regex_fails_in_one_line_from_the_console_script(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fimlora.cli", "calibrate", "--out", str(tmp_path / "o"),
                           "--targets", "re:(["], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "fimlora: error: argument --targets: targets regex '([' is not a valid regular expression "
        "(unterminated character set at position 1); fix it, e.g. r'.*\\.(q_proj|v_proj)' "
        "(see fimlora calibrate --help)"]


def test_unwritable_out_fails_before_the_model_is_loaded(tmp_path, capsys, monkeypatch):
    _no_model_loaded(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    _fails(["calibrate", "--out", str(blocker / "out")], capsys, f"--out {blocker / 'out'}: {blocker} is not a directory")
    import os

    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):  # root ignores permissions
            monkeypatch.setattr("tempfile.mkdtemp", _read_only_mkdtemp)
        err = _fails(["calibrate", "--out", str(read_only / "a" / "out")], capsys, f"--out {read_only / 'a' / 'out'}: ")
        assert "cannot create a directory in" in err and "choose a writable --out" in err and ".tmp" not in err
    finally:
        read_only.chmod(0o755)
    assert not list(read_only.iterdir())


def _read_only_mkdtemp(*args, **kwargs):
    raise OSError(30, "Read-only file system")


def test_failed_run_removes_the_directories_it_created(tmp_path, capsys, minilm_dir):
    """A failure after the model was loaded (an infeasible budget) leaves no runs/x/y/z behind."""
    out = tmp_path / "runs" / "x" / "y" / "z" / "out"
    _fails(["calibrate", "--out", str(out), "--budget", "rank:10", "--r-min", "2", "--num-batches", "1"], capsys,
           "infeasible")
    assert not list(tmp_path.iterdir())


def test_r_min_above_r_max_fails_before_the_model_is_loaded(tmp_path, capsys, monkeypatch):
    _no_model_loaded(monkeypatch)
    _fails(["calibrate", "--out", str(tmp_path / "o"), "--rank", "4", "--r-min", "9"], capsys,
           "r_min=9 is above r_max=8")


def test_show_imports_no_transformers(tmp_path):
    import subprocess
    import sys

    plan = __import__("pathlib").Path(__file__).parent / "data" / "plan_format_1.json"
    code = ("import sys\nfrom fimlora.cli import main\nassert main(['show', sys.argv[1]]) == 0\n"
            "print('loaded:', ' '.join(sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(plan)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(done.stdout.rsplit("loaded:", 1)[1].split())
    assert "bert.pooler.dense" in done.stdout and "fimlora.plan" in loaded
    assert not {"transformers", "peft"} & loaded


def test_parser_choices_come_from_the_library():
    from fimlora.backends import BACKENDS
    from fimlora.choices import ALPHA_POLICIES, GRANULARITIES, IF_UNCERTAIN, QUANTIZATIONS, SCORES, TASKS
    from fimlora.cli.parser import build_parser

    calibrate = build_parser()._subparsers._group_actions[0].choices["calibrate"]
    choices = {a.dest: tuple(a.choices) for a in calibrate._actions if a.choices}
    assert choices == {"task": ("auto", *TASKS), "dtype": ("float32", "bfloat16", "float16"), "quantize": QUANTIZATIONS,
                       "alpha_policy": ALPHA_POLICIES, "score": SCORES, "granularity": GRANULARITIES,
                       "backend": BACKENDS, "if_uncertain": IF_UNCERTAIN}


def test_unreadable_plan(tmp_path, capsys):
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    _fails(["show", str(bad)], capsys, "plan.json")


def test_env_lists_backends(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "backend torch: available" in out and "peft" in out
    assert f"accelerate: {metadata.version('accelerate')}" in out and "cuda devices:" in out


def _launched_plan_matches_one_process(launcher, model_dir, text_file, tmp_path):
    """Run ``launcher + fimlora.cli calibrate`` with 2 processes of batch 2 and compare with one
    process of batch 4 on the same 12 examples: rank 0 alone reports and writes the same plan."""
    import subprocess

    common = ["--model", str(model_dir), "--data", str(text_file), "--num-batches", "3", "--rank", "4", "--quiet"]
    one = tmp_path / "one"
    assert main(["calibrate", "--out", str(one), "--batch-size", "4", *common]) == 0
    two = tmp_path / "two"
    command = [*launcher, "-m", "fimlora.cli", "calibrate", "--out", str(two), "--batch-size", "2", *common]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("calibrated 14 layers on 12 samples") == 1, "only rank 0 reports and writes"
    single, distributed = RankPlan.load(one / "fimlora_plan.json"), RankPlan.load(two / "fimlora_plan.json")
    assert distributed.calibration["world_size"] == 2 and distributed.calibration["samples"] == 12
    assert distributed.ranks == single.ranks
    for a, b in zip(single.layers, distributed.layers, strict=True):
        assert b.score == pytest.approx(a.score, rel=1e-4)


def test_cli_under_torchrun_matches_one_process(tiny_model_dir, text_file, tmp_path):
    """`torchrun --nproc_per_node=2 ... fimlora calibrate`."""
    import sys

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    _launched_plan_matches_one_process(launcher, tiny_model_dir, text_file, tmp_path)


def test_cli_under_accelerate_launch_matches_one_process(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """`accelerate launch --cpu --num_processes 2 ... fimlora calibrate`: on CPUs accelerate starts
    the processes with mpirun, which announces the world in its own variables, not torchrun's."""
    import shutil
    import sys

    pytest.importorskip("accelerate")
    require(shutil.which("mpirun") is not None, "accelerate launches several CPU processes with mpirun: "
            "install Open MPI (apt-get install openmpi-bin)")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT", "1")  # containers and CI often run as root
    monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--mpirun_hostfile", str(hostfile)]
    _launched_plan_matches_one_process(launcher, tiny_model_dir, text_file, tmp_path)


def _dequantized_model_dir(model_dir, directory):
    """The model as the nf4 loader quantizes it, saved back with its dequantized weights as plain
    linears: the float model whose arithmetic the 4-bit layers perform."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fimlora.modelio import quantization_config

    quantized = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization_config("nf4", torch.float32),
                                                     device_map="cpu")
    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            plain.get_submodule(name).weight.data.copy_(weight)
    plain.save_pretrained(directory)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(directory)
    return directory


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_base_model(quantizable_model_dir, text_file, tmp_path, quantize):
    """--quantize loads the base linears as bitsandbytes layers (QLoRA's base model); the adapter
    written loads onto that quantized base with vanilla PEFT."""
    pytest.importorskip("bitsandbytes", reason="--quantize needs bitsandbytes")
    from transformers import AutoModelForCausalLM

    from fimlora.modelio import quantization_config

    common = ["--data", str(text_file), "--num-batches", "2", "--batch-size", "4", "--rank", "4", "--quiet"]
    out = tmp_path / quantize
    assert main(["calibrate", "--model", str(quantizable_model_dir), "--quantize", quantize, "--out", str(out), *common]) == 0
    plan = RankPlan.load(out / "fimlora_plan.json")
    assert plan.calibration["quantize"] == quantize and len(plan.layers) == 14
    base = AutoModelForCausalLM.from_pretrained(quantizable_model_dir, quantization_config=quantization_config(quantize, torch.float32),
                                                device_map="cpu")
    loaded = PeftModel.from_pretrained(base, out)
    for name, rank in plan.ranks.items():
        if rank:
            assert loaded.base_model.model.get_submodule(name).lora_A["default"].weight.shape[0] == rank
    if quantize == "nf4":  # the same calibration on the float model with the dequantized weights
        reference = tmp_path / "reference"
        model_dir = _dequantized_model_dir(quantizable_model_dir, tmp_path / "dequantized")
        assert main(["calibrate", "--model", str(model_dir), "--out", str(reference), *common]) == 0
        expected = RankPlan.load(reference / "fimlora_plan.json")
        worst = max(abs(b.score - a.score) / a.score for a, b in zip(expected.layers, plan.layers, strict=True))
        print(f"--quantize nf4: worst relative score difference from the dequantized float model {worst:.1e}")
        assert worst < 1e-4
        assert plan.ranks == expected.ranks


def test_quantize_without_bitsandbytes_fails_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # as if not installed
    _fails(["calibrate", "--model", str(tmp_path / "never-read"), "--quantize", "nf4", "--out", str(tmp_path / "o")],
           capsys, "pip install bitsandbytes")
    assert not (tmp_path / "o").exists()


def test_cli_calibrates_on_completions_of_a_json_file(tmp_path, tiny_model_dir, capsys):
    """A .json array in the instruction/input/output layout: the loss covers the completion only,
    so the scores differ from calibrating on the whole text; the summary names the layout."""
    rows = [{"instruction": f"say number {i}", "input": "" if i % 2 else f"politely {i}", "output": f"number {i} it is"}
            for i in range(16)]
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(rows))
    common = ["calibrate", "--model", str(tiny_model_dir), "--num-batches", "2", "--batch-size", "4", "--no-shuffle"]
    assert main([*common, "--data", str(data), "--out", str(tmp_path / "sft")]) == 0
    err = capsys.readouterr().err
    assert "prompt_template=alpaca" in err and "completion_column=output" in err
    whole = tmp_path / "whole.jsonl"
    whole.write_text("\n".join(json.dumps({"text": r["instruction"] + " " + r["output"]}) for r in rows))
    assert main([*common, "--data", str(whole), "--out", str(tmp_path / "whole")]) == 0
    sft = RankPlan.load(tmp_path / "sft" / "fimlora_plan.json")
    plain = RankPlan.load(tmp_path / "whole" / "fimlora_plan.json")
    assert [layer.score for layer in sft.layers] != pytest.approx([layer.score for layer in plain.layers], rel=1e-3)
    assert sft.calibration["columns"]["completion_column"] == "output"


def test_cli_target_column_on_a_causal_lm_points_to_prompt_and_completion(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "pc.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(8)))
    out = tmp_path / "out"
    assert main(["calibrate", "--model", str(tiny_model_dir), "--data", str(data), "--text-column", "prompt",
                 "--target-column", "completion", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prompt-column and --completion-column" in err[0]
    assert not out.exists()
    assert main(["calibrate", "--model", str(tiny_model_dir), "--data", str(data), "--prompt-column", "prompt",
                 "--completion-column", "completion", "--num-batches", "2", "--batch-size", "4", "--out", str(out)]) == 0

"""Every benchmark script runs end to end with --smoke (as CI does) and writes its smoke CSV;
the measuring harness (benchmarks/_memory.py) reports peaks, skips, errors and timeouts; no
benchmark process, parent or worker, sees the checkout's kernels/ as `kernels` (DESIGN §4); no
script imports another script."""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

CHECKOUT = Path(__file__).resolve().parents[1]
BENCHMARKS = CHECKOUT / "benchmarks"
RESULTS = BENCHMARKS / "results"
OUR_KERNELS = CHECKOUT / "kernels"
sys.path.insert(0, str(BENCHMARKS))

from _memory import Isolated, Skip, measure_peak, serve  # noqa: E402

# script -> (smoke CSV it must write, methods that must have run: never skipped on a CPU install)
SCRIPTS = {
    "op_throughput.py": ("op_throughput_smoke.csv", set()),
    "calibration_overhead.py": ("calibration_overhead_smoke.csv", {"floor", "fimlora-torch", "peft", "bs1", "bmm"}),
    "memory_vs_fisher.py": ("memory_vs_fisher_smoke.csv", {"floor", "fimlora", "fisher"}),
    "calibration_at_scale.py": ("calibration_at_scale_smoke.csv", {"floor", "fimlora", "full-fisher"}),
    "tune_triton.py": ("tune_triton_smoke.csv", {"default"}),  # under TRITON_INTERPRET=1
    "memory_at_scale.py": ("memory_at_scale_smoke.csv", set()),
    "confidence_overhead.py": ("confidence_overhead_smoke.csv", set()),
    "confidence_stops.py": ("confidence_stops_smoke.csv", set()),
}


@pytest.fixture(scope="module")
def smoke_runs() -> dict[str, tuple[subprocess.CompletedProcess, float]]:
    """Every script's --smoke run, all started at once (each mostly waits on its child processes),
    so that the whole check stays well under a minute."""
    started = time.time()
    running = {script: subprocess.Popen([sys.executable, str(BENCHMARKS / script), "--smoke"], cwd=BENCHMARKS.parent,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for script in SCRIPTS}
    done = {}
    for script, process in running.items():
        try:
            stdout, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        done[script] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), started)
    return done


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_smoke_run_writes_its_csv(script, smoke_runs):
    csv_name, required = SCRIPTS[script]
    done, started = smoke_runs[script]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # bitsandbytes names the `kernels` it found when that is the checkout's folder
    assert str(OUR_KERNELS) not in done.stdout + done.stderr, "the checkout's kernels/ stood in for `kernels`"
    path = RESULTS / csv_name
    assert path.is_file() and path.stat().st_mtime >= started - 1, f"{path} was not written"
    rows = list(csv.DictReader(path.open()))
    assert rows, f"{path} is empty"
    if "status" in rows[0]:
        failed = [(r["method"], r["status"], r.get("reason") or r.get("note")) for r in rows
                  if r["status"] in ("error", "timeout", "oom")]
        assert not failed, failed  # a missing optional package is a skip; anything else is a bug
        ran = {r["method"] for r in rows if r["status"] == "ok"}
        assert required <= ran, f"{required - ran} did not run: " + done.stdout[-2000:]
    if "rel_err" in rows[0]:  # every contender must reproduce fimlora's statistics
        errors = {r["method"]: float(r["rel_err"]) for r in rows if r.get("rel_err")}
        assert errors and max(errors.values()) < 1e-4, errors


def test_measure_peak_sees_what_the_method_allocates():
    def allocate():
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        return float(block[-1])

    _, memory = measure_peak(allocate)
    assert 60 * 2**20 <= memory["peak_extra_bytes"] <= 80 * 2**20, memory


def test_serve_turns_skips_and_failures_into_statuses(tmp_path):
    def skipping(workload, spec):
        raise Skip("not installed here")

    def failing(workload, spec):
        raise ValueError("boom")

    def working(workload, spec):
        return {"seconds": [0.0], "stats": {"layer": {"mean": torch.zeros(2)}}}

    methods = {"skipping": skipping, "failing": failing, "working": working}
    build = lambda spec: None  # noqa: E731
    assert serve({"method": "skipping"}, build, methods) == {"status": "skipped", "reason": "not installed here"}
    assert serve({"method": "failing"}, build, methods)["reason"] == "ValueError: boom"
    assert serve({"method": "absent"}, build, methods)["status"] == "skipped"
    result = serve({"method": "working", "stats_path": str(tmp_path / "s.pt")}, build, methods)
    assert result["status"] == "ok" and torch.load(result["stats_path"])["layer"]["mean"].shape == (2,)


def sleeper(spec: dict) -> dict:
    time.sleep(spec["seconds"])
    return {"status": "ok", "slept": spec["seconds"]}


def test_isolated_runs_in_a_fresh_process_and_gives_up_on_time():
    isolated = Isolated()
    assert isolated.run(sleeper, {"seconds": 0}, timeout=60) == {"status": "ok", "slept": 0}
    assert isolated.run(sleeper, {"seconds": 30}, timeout=1)["status"] == "timeout"


def test_calibration_at_scale_falls_back_when_a_backend_fails(capsys):
    """On the GPU a kernel that has never run there may fail: the point is then measured with the
    torch backend and says why, instead of the run losing its measurements."""
    import calibration_at_scale

    assert calibration_at_scale.main(["--smoke", "--backend", "no-such-backend", "--no-fisher"]) == 0
    out = capsys.readouterr().out
    assert "measuring with backend 'torch' instead" in out
    rows = list(csv.DictReader((RESULTS / "calibration_at_scale_smoke.csv").open()))
    assert {r["backend"] for r in rows} == {"torch"} and all("no-such-backend" in r["note"] for r in rows)
    assert {r["method"]: r["status"] for r in rows} == {"floor": "ok", "fimlora": "ok"}


def kernels_origin(spec: dict) -> dict:
    """Where `kernels` comes from in this process: the module already imported (the fork server
    imports bitsandbytes, which imports `kernels`), else what an import would find."""
    module = sys.modules.get("kernels")
    if module is not None:
        return {"status": "ok", "origin": str(getattr(module, "__file__", None))}
    found = importlib.util.find_spec("kernels")
    return {"status": "ok", "origin": str(found and found.origin)}


def from_checkout(origin: str) -> bool:
    return origin != "None" and Path(origin).resolve().parent == OUR_KERNELS


@pytest.mark.slow
def test_benchmark_workers_never_import_the_checkouts_kernels_folder():
    """DESIGN §4 for the benchmarks: a parent started from the checkout's root with the root on its
    path (``python -c`` puts the working directory there) imports a benchmark script, which takes
    the root off; its workers, started as the benchmarks start them (``Isolated`` and its fork
    server preloading the contenders' packages, bitsandbytes among them), do not see it either."""
    assert from_checkout(str(OUR_KERNELS / "__init__.py"))  # the check itself can fail
    probe = (
        "import json, sys\n"
        f"sys.path[:0] = ['', {str(BENCHMARKS)!r}, {str(CHECKOUT / 'tests')!r}]\n"
        "import calibration_overhead\n"
        "from _contenders import PRELOAD\n"
        "from _memory import Isolated\n"
        "from test_benchmarks import kernels_origin\n"
        "worker = Isolated(PRELOAD).run(kernels_origin, {}, timeout=240)\n"
        "print(json.dumps({'parent': kernels_origin({}), 'worker': worker}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=CHECKOUT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["worker"]["status"] == "ok", seen
    assert not from_checkout(seen["parent"]["origin"]) and not from_checkout(seen["worker"]["origin"]), seen
    assert str(OUR_KERNELS) not in done.stderr, done.stderr[-3000:]


def test_no_script_imports_another_script():
    """Scripts share code through the underscore modules only (benchmarks/README.md), and every
    script's smoke run is checked above."""
    scripts = {path.stem for path in BENCHMARKS.glob("*.py") if not path.name.startswith("_")}
    assert {f"{name}.py" for name in scripts} == set(SCRIPTS)
    for path in BENCHMARKS.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & scripts, f"{path.name} imports the script(s) {sorted(imported & scripts)}"

"""The wheel a user installs (DESIGN §4): kernels/ ships as fimlora._kernels and nothing installs a
top-level `kernels`; the built-in calibration data ships too; the CLI entry point is declared.
Built pure-Python (FIMLORA_BUILD_EXT=0) from a copy of the tracked files, installed into a
folder of its own and imported from a process outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files are the source")
    source = tmp_path_factory.mktemp("source")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                           str(source)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FIMLORA_BUILD_EXT": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.glob("fimlora-*.whl")
    return built


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {"fimlora/_kernels/accumulate.py", "fimlora/_kernels/accumulate_kernel.py"} <= set(names)
    assert "fimlora/data/builtin_sentiment.jsonl" in names
    assert not [n for n in names if n.startswith("kernels/")], "kernels/ must only ship as fimlora._kernels"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "fimlora = fimlora.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_imports_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = ("import importlib.util, fimlora, fimlora._kernels; from fimlora.data import builtin_examples; "
             "s = importlib.util.find_spec('kernels'); "
             "print(fimlora.__file__); print(s and s.origin); print(len(builtin_examples()))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr[-3000:]
    module_file, kernels_origin, examples = done.stdout.split("\n")[:3]
    assert module_file.startswith(str(site)), "the installed wheel, not the checkout, must be imported"
    assert not kernels_origin.startswith(str(site)), "the wheel installed a top-level `kernels`"
    assert int(examples) == 128


def test_public_api_is_explicit_and_covers_the_readme():
    """Every ``fimlora.<name>`` the README uses is in ``__all__`` and resolves; nothing private is."""
    import re

    import fimlora

    readme = (ROOT / "README.md").read_text()
    used = set(re.findall(r"\bfimlora\.([A-Za-z_]\w*)\b", readme)) - {"data", "cli", "_C", "_kernels", "__all__"}
    assert used <= set(fimlora.__all__), sorted(used - set(fimlora.__all__))
    assert all(not name.startswith("_") for name in fimlora.__all__)
    for name in fimlora.__all__:
        assert getattr(fimlora, name) is not None
    assert callable(fimlora.calibrate) and callable(fimlora.allocate)  # functions, not their modules

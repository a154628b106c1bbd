# moesim: two entry points. `make demo` runs the main job on the embedded default; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is an optional extra; pin the CPU build that is local on these machines.
TORCH_PIN := torch==2.13.0
TRANSFORMERS_PIN := transformers==5.24.0

.PHONY: demo test bench venv venv-full clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

$(VENV)/.full: $(VENV)/.core
	$(PY) -m pip install -q "$(TORCH_PIN)" "$(TRANSFORMERS_PIN)"
	touch $@

venv: $(VENV)/.core
venv-full: $(VENV)/.full

demo: $(VENV)/.core
	$(PY) -m moesim simulate --system dgx-h100 --model flame-moe-290m --trace default --micro-batches 2 --out run/demo
	$(PY) -m moesim report run/demo

test: $(VENV)/.full
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(VENV)/.full
	$(PY) -m benchmarks.run_all

clean:
	rm -rf run .pytest_cache

# moesim: two entry points. `make demo` runs the main job on the embedded default; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is an optional extra; pin the CPU build that is local on these machines.
TORCH_PIN := torch==2.13.0
TRANSFORMERS_PIN := transformers==5.24.0

.PHONY: demo test bench venv venv-full browser clean

# Set-up is part of the targets: pip prints its own progress, each step says what it does.
$(VENV)/.core: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { echo "make: moesim needs Python >= 3.11 as '$(PYTHON)'; install it (Debian: apt-get install python3 python3-venv) or run 'make PYTHON=/path/to/python3.11 ...'" >&2; exit 1; }
	@echo "== [1/3] creating $(VENV) with $(PYTHON)"
	@$(PYTHON) -m venv $(VENV) || { echo "make: '$(PYTHON) -m venv' failed; on Debian/Ubuntu install python3-venv (apt-get install python3-venv)" >&2; exit 1; }
	@echo "== [2/3] upgrading pip"
	$(PY) -m pip install --upgrade pip
	@echo "== [3/3] installing moesim (editable) with the dev extras"
	$(PY) -m pip install -e ".[dev]"
	@touch $@

$(VENV)/.full: $(VENV)/.core
	@echo "== installing the test extras: $(TORCH_PIN) (CPU) and $(TRANSFORMERS_PIN)"
	$(PY) -m pip install "$(TORCH_PIN)" "$(TRANSFORMERS_PIN)"
	@touch $@

venv: $(VENV)/.core
venv-full: $(VENV)/.full

# the browser tests need Chromium: installed here when missing and possible, else one line says what to install
browser:
	@bash tools/ensure-chromium.sh

# run/demo is the output of this target, written fresh each time (an existing run is never overwritten)
demo: $(VENV)/.core
	@echo "== simulating the bundled FLAME-MoE-290M trace on a DGX-H100 model"
	@rm -rf run/demo
	$(PY) -m moesim simulate --system dgx-h100 --model flame-moe-290m --trace default --micro-batches 2 --out run/demo
	$(PY) -m moesim report run/demo

# TESTS narrows the run (e.g. make test TESTS=tests/moesim/study); empty = the whole suite
TESTS ?=
test: browser $(VENV)/.full
	@echo "== running the test suite"
	$(PY) -m pytest -q -p no:cacheprovider $(TESTS)

bench: $(VENV)/.full
	$(PY) -m benchmarks.run_all

clean:
	rm -rf run .pytest_cache

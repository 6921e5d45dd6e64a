# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0

.PHONY: demo test mutation install install-dev lint lint-imports format typecheck bench clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	touch $@

# torch goes first, pinned; later installs are constrained so nothing swaps it for a CUDA build.
$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -c constraints.txt -e ".[all]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e ".[all,dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/kiln train configs/digits.yaml

test: install-dev
	$(PY) -m pytest -q

# Remove each guarded mechanism in a scratch copy and check its test fails (slow; not in CI).
mutation: install-dev
	$(PY) mutations/run.py

lint: install-dev lint-imports
	$(VENV)/bin/ruff check src tests benchmarks examples mutations
	$(VENV)/bin/ruff format --check src tests benchmarks examples mutations
	$(VENV)/bin/mypy

# The import contracts in .importlinter: layers, independent tools, no cycle (about a second).
lint-imports: install-dev
	$(VENV)/bin/lint-imports --no-cache

format: install-dev
	$(VENV)/bin/ruff format src tests benchmarks examples
	$(VENV)/bin/ruff check --fix src tests benchmarks examples

bench: install
	$(PY) benchmarks/loop_overhead.py
	$(PY) benchmarks/import_time.py
	$(PY) benchmarks/time_to_accuracy.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

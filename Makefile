# The front door. `make demo` and `make test` work on a fresh machine: each installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build this machine holds; pyproject.toml states the range users need.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install lint format test demo faults bench bench-gpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[worker,local,dev]"
	touch $@

lint: install
	$(BIN)/ruff check shared producer worker tests bench
	$(BIN)/ruff format --check shared producer worker tests bench
	$(BIN)/mypy

format: install
	$(BIN)/ruff format shared producer worker tests bench
	$(BIN)/ruff check --fix shared producer worker tests bench

test: install lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install
	bash scripts/demo.sh

faults: install
	$(BIN)/python -m tests.faults

bench: install
	$(BIN)/python -m bench.run

bench-gpu: install
	$(BIN)/python bench/gpu.py --tiny

clean:
	rm -rf $(VENV) .sdfarm out .pytest_cache .mypy_cache .ruff_cache

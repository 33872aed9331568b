# Two commands: `make demo` and `make test`. Both bootstrap .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision pair for this CPU box (pip takes them from local disk); the package range in
# pyproject.toml still admits a GPU image's torch (2.11 and up): override TORCH_SPEC there.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: test test-fast demo lint bench clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev,sd]"
	# deepspeed builds against the installed torch, hence no build isolation
	$(BIN)/pip install -q --no-build-isolation "deepspeed>=0.14"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/python -m jobs.demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)

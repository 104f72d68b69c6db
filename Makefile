# Two commands on a fresh machine:  make demo  |  make test
# Both create .venv at the repo root if it is missing. torch is pinned to the CPU
# build that lies on this project's machines (see DEVELOPERS.md); install it first so
# that kdlab's `torch>=2.2` requirement never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

$(BIN)/kdlab: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[demo,dev]"
	touch $@

# timm (kdlab[timm]) needs torchvision, and PyPI's torchvision does not load beside the
# 2.13.0 CPU file: the timm tests run in a second venv with the torch + torchvision pair
# that lies on this project's machines (a CUDA build, ~5.5 GB, installed from local disk).
TIMM_VENV := .venv-timm
TIMM_TORCH ?= torch==2.14.1 torchvision==0.29.1

$(TIMM_VENV)/bin/kdlab: pyproject.toml
	test -x $(TIMM_VENV)/bin/python || $(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TIMM_VENV)/bin/python -m pip install --quiet $(TIMM_TORCH)
	$(TIMM_VENV)/bin/python -m pip install --quiet -e ".[timm,demo]" "pytest>=7"
	touch $@

.PHONY: install demo test test-timm
install: $(BIN)/kdlab

demo: $(BIN)/kdlab
	$(BIN)/kdlab demo

test: $(BIN)/kdlab
	$(BIN)/python -m pytest -q

test-timm: $(TIMM_VENV)/bin/kdlab
	$(TIMM_VENV)/bin/python -m pytest -q tests/test_timm.py tests/test_taps.py

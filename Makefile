# Two commands on a fresh machine:  make demo  |  make test
# Both create .venv at the repo root if it is missing: one environment for the demo, the
# tests and CI. torch, torchvision and torchcodec are pinned to releases that import together and lie on
# this project's machines (a CUDA build of torch 2.14.1, ~5.5 GB, also fine on a CPU):
# installing them first keeps kdlab's `torch>=2.2` from pulling another build.
# `make TORCH="torch==X torchvision==Y torchcodec==Z" test` picks another pair (see DEVELOPERS.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.14.1 torchvision==0.29.1 torchcodec==0.17.0

$(BIN)/kdlab: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[demo,dev,timm]"
	touch $@

.PHONY: install demo test
install: $(BIN)/kdlab

demo: $(BIN)/kdlab
	$(BIN)/kdlab demo

test: $(BIN)/kdlab
	$(BIN)/python -m pytest -q

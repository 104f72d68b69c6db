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

.PHONY: install demo test
install: $(BIN)/kdlab

demo: $(BIN)/kdlab
	$(BIN)/kdlab demo

test: $(BIN)/kdlab
	$(BIN)/python -m pytest -q


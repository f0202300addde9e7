# `make demo` and `make test` set up everything on a fresh machine, then do the work.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The venv is rebuilt whenever pyproject.toml changes (stale) or is missing.
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel: an unpinned resolve pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/neuroarcade demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/neuroarcade bench transport

clean:
	rm -rf $(VENV)

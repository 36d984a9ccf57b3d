# Two commands for a new user:  `make demo`  (main job on the shipped default)  and  `make test`.
# Both create .venv and install the package on first use; later runs reuse it.
# CPU machines get the CPU build of torch (TORCH=torch==2.13.0). GPU users: see README ("GPU install").
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.openmm-snf-installed

.PHONY: setup demo test bench clean-demo

setup: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/openmm-snf demo --out demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/bridge.py

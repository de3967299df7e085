# Set-up on a fresh clone is part of both targets: a .venv is created if missing and the
# project is installed into it (torch's CPU build from local disk, pinned first so no CUDA
# build is pulled in).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
EXTRAS ?= dev,cpu,npu,nvidia
STAMP  := $(VENV)/.kvfuse-installed

.PHONY: run test lint typecheck clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

run: $(STAMP)
	$(VENV)/bin/kvfuse devices
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m pytest -q
	$(PY) tools/typecheck.py
	$(PY) -m ruff check sdk ops devices conformance tests examples tools

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Set-up on a fresh clone is part of both targets: a .venv is created if missing and the
# project is installed into it (torch's CPU build from local disk, pinned first so no CUDA
# build is pulled in). The editable install builds the cpu device's C kernel
# (devices/cpu/rows.c) in place, so a change to it installs again.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
EXTRAS ?= dev,cpu,npu,nvidia,rag,remote,hf
STAMP  := $(VENV)/.kvfuse-installed

.PHONY: run test lint typecheck clean gpu-check gpu-wheels

$(STAMP): pyproject.toml setup.py devices/cpu/rows.c Makefile examples/vendor_plugin/pyproject.toml
	@# the Mooncake wheel (remote tier) needs libibverbs at import time, even over TCP
	(dpkg -s libibverbs1 >/dev/null 2>&1 && command -v ip >/dev/null) \
		|| (apt-get update -qq && apt-get install -y -qq libibverbs1 iproute2) \
		|| echo "warning: libibverbs1 missing; the remote-tier tests will be skipped"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps -e examples/vendor_plugin
	touch $@

run: $(STAMP)
	$(VENV)/bin/kvfuse devices
	$(VENV)/bin/kvfuse conformance run --profile smoke > reports-smoke.log || (tail -40 reports-smoke.log; exit 1)
	tail -12 reports-smoke.log
	$(PY) examples/quickstart.py
	$(PY) examples/hf_rag.py
	$(VENV)/bin/kvfuse bench rag --questions 4 --context-tokens 1024,2048 --ratio 0.15
	$(VENV)/bin/kvfuse bench store --chunks 4
	$(VENV)/bin/kvfuse bench rag --tier device,host,disk --context-tokens 2048 --max-new-tokens 4

test: $(STAMP)
	$(PY) -m pytest -q -m "not netns"
	@# Mooncake clients bind listeners on every interface: where we can (root), give those
	@# tests a network of their own with loopback only; pytest's 5 (all skipped) is fine
	if unshare -n true 2>/dev/null; then \
		unshare -n sh -c 'ip link set lo up && $(PY) -m pytest -q -m netns; rc=$$?; [ $$rc -eq 5 ] || exit $$rc'; \
	else \
		echo "note: no private network namespace here; running the Mooncake tests directly"; \
		$(PY) -m pytest -q -m netns; rc=$$?; [ $$rc -eq 5 ] || exit $$rc; \
	fi
	$(VENV)/bin/kvfuse conformance run --device reference --device cpu --device npu --device acme --profile standard \
		--json reports/conformance.json --junitxml reports/conformance.xml > reports.log || (tail -40 reports.log; exit 1)
	TRITON_INTERPRET=1 $(VENV)/bin/kvfuse conformance run --device nvidia --profile smoke \
		--json reports/nvidia-interpreter.json > reports-nvidia.log || (tail -40 reports-nvidia.log; exit 1)
	cd examples && ../$(PY) -m pytest -q -p no:cacheprovider --pyargs kvfuse.conformance --kvfuse-device=acme --kvfuse-profile=smoke
	$(PY) tools/typecheck.py
	$(PY) -m ruff check sdk ops devices conformance tests examples tools

# The GPU machine has torch, triton, numpy, rich, pluggy, pyyaml but no pydantic and no
# registry: fetch pydantic's wheels (cp312, manylinux) here, carry .whl/ there.
gpu-wheels:
	$(PYTHON) -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl "pydantic>=2.6,<3"

# On a machine with an NVIDIA GPU and no network (uses the python3 there, not .venv)
gpu-check:
	tools/gpu_check.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

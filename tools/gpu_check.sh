#!/usr/bin/env bash
# make gpu-check: the CUDA paths on a machine with an NVIDIA GPU and no network.
#   1. install kvfuse there without a registry: the wheels `make gpu-wheels` put in .whl/
#      (pydantic and what it needs) plus an editable install of this checkout;
#   2. the full conformance profile on the nvidia device (real CUDA, no interpreter; a
#      fixed attention config: with autotuning it took 390 s of compiling on an H100);
#   3. the store's promotions into a pool on the GPU (exact bytes, layer by layer, from the
#      host and disk tiers), then kvfuse bench ops, bench store and bench rag on it.
# Reports (JSON, JUnit, logs) go to $OUT when set, else reports/gpu/. Every step runs even
# when one before it fails; the exit status is the first failure's.
set -u
PY=${PY:-python3}
OUT=${OUT:-reports/gpu}
mkdir -p "$OUT"
unset TRITON_INTERPRET
rc=0
step() {  # step NAME CMD...: run, time and log one step
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name: $*"
    "$@" 2>&1 | tee -a "$OUT/gpu-check.log"
    local r=${PIPESTATUS[0]}
    echo "== $name: exit $r after $((SECONDS - t0)) s"
    [ "$r" -eq 0 ] || [ "$rc" -ne 0 ] || rc=$r
}
if ! $PY -c "import pydantic" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: run 'make gpu-wheels' on a machine with network and carry .whl"; exit 2; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || exit 2
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 2
KVFUSE="$PY -m kvfuse._cli"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    | tee -a "$OUT/gpu.txt"
step devices $KVFUSE devices
# correctness, not speed: one fixed attention config, so each specialisation compiles once
KVFUSE_NVIDIA_AUTOTUNE=0 step conformance $KVFUSE conformance run --device nvidia --profile full \
    --json "$OUT/conformance-nvidia.json" --junitxml "$OUT/conformance-nvidia.xml"
step store-cuda $PY -m pytest -q -p no:cacheprovider tests/sdk/store/test_promote.py
step bench-ops $KVFUSE bench ops --device nvidia --json "$OUT/bench-ops-nvidia.json"
step bench-store $KVFUSE bench store --device nvidia --json "$OUT/bench-store-nvidia.json"
step bench-rag $KVFUSE bench rag --model random --device nvidia --context-tokens "${RAG_TOKENS:-8192}" --layers 16 \
    --json "$OUT/bench-rag-nvidia.json"
exit $rc

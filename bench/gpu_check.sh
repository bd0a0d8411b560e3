#!/usr/bin/env bash
# The GPU checks in one call on a CUDA machine: the CUDA tests, then bench/gpu.py.
#
#   bash bench/gpu_check.sh [quick]
#
# Uses the machine's python3 (with a CUDA torch). Where the project's own
# dependencies are missing there, wheels in ./.whl (pydantic, pydantic-settings and
# a wheel of this project, for its entry points) are installed into /tmp/site first.
# Logs and the benchmark's JSON go to $OUT (default /tmp/kvbm-gpu-check); the
# tables are printed last.
set -u
OUT=${OUT:-/tmp/kvbm-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
  --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"

# 1. Tests: every gpu-marked test, and the whole of the files that hold them, so the
#    CPU-side tests of the same modules also run with a CUDA device present.
timeout 300 $PY -m pytest -v -p no:cacheprovider -x -rs \
  tests/test_gpu_cuda.py tests/test_gpu_tier.py tests/test_host_tier.py \
  tests/test_engine_blocks_huge.py tests/test_hf_connector.py 2>&1 | tee "$OUT/tests.log" | tail -25
echo "tests rc=${PIPESTATUS[0]}"

# 2. Transfers beside one torch copy of the same bytes (pinned host <-> device). Each
#    case's row is printed (and its JSON rewritten) as it finishes, so a run cut short by
#    its timeout still reports what it measured.
if [ "${1:-}" = quick ]; then args=(--repeats 5 --no-sweep); else args=(--repeats 7); fi
timeout 200 $PY bench/gpu.py "${args[@]}" --json-out "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log"
echo "bench rc=${PIPESTATUS[0]}"
timeout 100 $PY bench/gpu.py --repeats 5 --no-sweep --backend cupy --json-out "$OUT/gpu_cupy.json" \
  2>&1 | tee "$OUT/bench_cupy.log"
echo "bench cupy rc=${PIPESTATUS[0]}"

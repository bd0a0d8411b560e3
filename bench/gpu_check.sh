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
timeout 300 $PY -m pytest -q -p no:cacheprovider -x -rs \
  tests/test_gpu_cuda.py tests/test_gpu_tier.py tests/test_host_tier.py \
  tests/test_engine_blocks_huge.py tests/test_hf_connector.py 2>&1 | tee "$OUT/tests.log" | tail -25
echo "tests rc=${PIPESTATUS[0]}"

# 2. Transfers beside one torch copy of the same bytes (pinned host <-> device).
if [ "${1:-}" = quick ]; then args=(--repeats 5 --no-sweep); else args=(--repeats 7); fi
timeout 240 $PY bench/gpu.py "${args[@]}" --json > "$OUT/gpu.json" 2> "$OUT/gpu.err"
echo "bench rc=$?"
timeout 120 $PY bench/gpu.py --repeats 5 --no-sweep --backend cupy --json > "$OUT/gpu_cupy.json" 2> "$OUT/gpu_cupy.err"
echo "bench cupy rc=$?"
$PY - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
for name in ("gpu.json", "gpu_cupy.json"):
    try:
        r = json.load(open(f"{out}/{name}"))
    except Exception as e:  # noqa: BLE001
        print(name, "unreadable:", e)
        continue
    print(f"{name}: {r['device_name']}, {r['blocks']} blocks x {r['block_bytes'] >> 20} MiB, backend {r['copy_backend']}")
    for case, c in r["cases"].items():
        print(f"  {case:28s}" + "".join(
            f" {k}={v['gbps']:.1f}/{v['limit_gbps']:.1f}={v['ratio']:.2f}" for k, v in c.items()))
    for row in r.get("sweep", []):
        print(f"  sweep run {row['run_bytes']:7d} B gather {row['gather']['d2h_ratio']:.2f}/"
              f"{row['gather']['h2d_ratio']:.2f} per_block {row['per_block']['d2h_ratio']:.2f}/"
              f"{row['per_block']['h2d_ratio']:.2f}")
EOF

#!/usr/bin/env bash
# One device call: install the missing wheels, then run the named stages, logs and JSON under $OUT.
#   bash bench/device_run.sh tests exact tiers          (stages: tests exact offload sparse shadow token timeline tiers kernels memcheck diag putsync)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 OFFLOAD_NO_PROGRESS=1 OFFLOAD_CACHE=/tmp/offload-cache
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    tests)    python -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    exact)    python bench/decode.py --ctx 8K,32K --modes exact,hf --steps 32 --out "$OUT/decode_exact.json" 2>&1 | tail -12 ;;
    offload)  python bench/decode.py --ctx 32K,128K --modes offload-full,hf-offload,sparse --steps 8 --warmup 2 \
                --budget 2K --kv-gpu-mem 2GiB --host-mem 48GiB --hf-chunk 4096 --out "$OUT/decode_offload.json" 2>&1 | tail -14 ;;
    sparse)   python bench/decode.py --ctx 32K,128K --modes sparse --steps 64 --warmup 2 --budget 2K --host-mem 48GiB \
                --out "$OUT/decode_sparse.json" 2>&1 | tail -8 ;;
    shadow)   python bench/decode.py --ctx 32K,128K --modes sparse --index shadow --steps 64 --warmup 2 --budget 2K \
                --host-mem 48GiB --out "$OUT/decode_sparse_shadow.json" 2>&1 | tail -8 ;;
    token)    python bench/decode.py --ctx 32K,128K --modes sparse --select-unit token --token-candidates 4 --steps 64 \
                --warmup 2 --budget 2K --host-mem 48GiB --out "$OUT/decode_sparse_token.json" 2>&1 | tail -8
              python bench/decode.py --ctx 128K --modes sparse --select-unit token --token-candidates 8 --steps 64 \
                --warmup 2 --budget 2K --host-mem 48GiB --out "$OUT/decode_sparse_token8.json" 2>&1 | tail -8 ;;
    timeline) timeout 200 python bench/timeline.py --ctx 128K --attention sparse --budget 2K --host-mem 48GiB --out "$OUT/timeline.json" 2>&1 | tail -40 ;;
    diag)     python bench/diag_fp32.py 2>&1 | grep -v Writing | tail -30 ;;
    tiers)    python bench/tiers.py --out "$OUT/tiers.json" 2>&1 | tail -25 ;;
    memcheck) CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
              "$CS" --tool memcheck --error-exitcode 9 python -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py tests/test_token_stage.py \
                2>&1 | tee "$OUT/memcheck.log" | grep -E "ERROR SUMMARY|passed|failed" | tail -3 ;;
    putsync)  python bench/diag_put_sync.py 2>&1 | tail -30 ;;
    kernels)  python bench/kernel_bench.py --out "$OUT/kernels.json" 2>&1 | tail -25 ;;
  esac
done
echo "=== done $(date +%T)"

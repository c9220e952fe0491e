#!/usr/bin/env bash
# Issue 13's fidelity harness on one GPU in one process: the needle suite (162 questions, 2K/4K/8K x 3 sources x
# 3 documents) and teacher forcing (7,936 + 256 tokens) for every index and unit, with the oracle, against full
# attention on SmolLM2-135M (real GGUF). Writes OUT/fidelity_gpu.{json,md,log} and OUT/fidelity_tables.md.
# The headline of the tables is "retrieval kept" (bench/fidelity.py's docstring says why).
#
# The device command (one `run` call; the GGUF at $OFFLOAD_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf, carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; export PYTHONUNBUFFERED=1 OFFLOAD_NO_PROGRESS=1 OFFLOAD_OFFLINE=1; bash bench/fidelity_gpu.sh $OUT
#
# Getting the GGUF there (98 MB, over one call's 64 MiB): split it here into two git-ignored folders (`head -c 40000000
# GGUF > .gga/part`, `tail -c +40000001 GGUF > .ggb/part`); call 1 carries .gga and copies it to /tmp/oc/partA (a
# folder of the repo that the next call does not carry is removed there; /tmp stays while the machine is warm, 30 s);
# call 2, issued at once, carries .ggb, concatenates both into /tmp/oc and runs this with OFFLOAD_CACHE=/tmp/oc
# (2026-11-30: ~65 s a document for 10 methods, so 162 questions need DEADLINE_S of ~1,700: two or three calls).
#
# Time: teacher forcing first (11 x 256 steps), then the suite's documents round-robin over 8K/4K/2K until
# DEADLINE_S (default 300 s after start; the document under way finishes): the JSON's row counts say how much ran.
# Env: DTYPE (float32 | bfloat16, default float32), DEADLINE_S, CONTEXTS (default 2K,4K,8K), DOCS (per context and
# source, default 3), METHODS (comma list, default below), DEVICE (default cuda), THREADS (torch CPU threads,
# default 8), EXTRA (more fidelity.py flags).
# A CPU smoke of the same path: DEVICE=cpu THREADS=1 DEADLINE_S=0 CONTEXTS=1K DOCS=1 EXTRA="--suite-sources lists
#   --teacher-context 1024 --continuation 8" bash bench/fidelity_gpu.sh /tmp/fidelity_smoke
set -uo pipefail
OUT=${1:?usage: bash bench/fidelity_gpu.sh OUT_DIR}
mkdir -p "$OUT"
GGUF=${OFFLOAD_CACHE:-$HOME/.cache/offload}/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ]; then
  echo "error: $GGUF is missing; set OFFLOAD_CACHE to the folder that holds SmolLM2-135M-Instruct.Q4_1.gguf" >&2
  exit 2
fi
export OFFLOAD_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 OFFLOAD_NO_PROGRESS=1
# the default = LLM(attention="sparse"), index auto (offload/selection.py): where the shadows fit on the GPU the
#   accurate preset (shadow-r32-mass-cf1@2K/32+tok8sumshm0.97f64), else whole chunks (summary-max@2K/32)
# oracle     = the chunks of largest exact attention mass (the ceiling of any chunk index at that budget)
# +tokF      = token stage over F x the budget's chunks; mP fF = token-mass cap (p, floor); sh = shadow-ranked tokens
METHODS=${METHODS:-summary-max@2K/32,shadow-r32-mass-cf1@2K/32+tok8sumshm0.97f64,oracle@5%/16,summary-max@5%/16,shadow-r32-mass@5%/16,ann-l2aug@5%/16,\
summary-max@10%/16+tok8m0.97f64,shadow-r32-mass@10%/16+tok4m0.97f64,shadow-r32-mass@5%/16+tok4sumsh,\
shadow-r32-mass-cf1@5%/16+tok8sumsh}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
echo "=== fidelity $(date +%T)"
# shellcheck disable=SC2086  # EXTRA: several flags
python bench/fidelity.py --device "${DEVICE:-cuda}" --dtype "${DTYPE:-float32}" --model "$GGUF" --parts teacher,suite \
  --suite-contexts "${CONTEXTS:-2K,4K,8K}" --suite-docs "${DOCS:-3}" --suite-methods "$METHODS" \
  --teacher-methods "$METHODS" --deadline-s "${DEADLINE_S:-300}" --threads "${THREADS:-8}" ${EXTRA:-} \
  --out "$OUT/fidelity_gpu.json" --markdown "$OUT/fidelity_gpu.md" > "$OUT/fidelity_gpu.log" 2>&1
rc=$?
grep -v "^\[ *[0-9]*s\]   " "$OUT/fidelity_gpu.log" | tail -60      # progress lines of single questions left out
python bench/fidelity_tables.py "$OUT/fidelity_gpu.json" --teacher "$OUT/fidelity_gpu.json" > "$OUT/fidelity_tables.md" \
  && cat "$OUT/fidelity_tables.md"
echo "=== done $(date +%T) rc $rc"
exit $rc

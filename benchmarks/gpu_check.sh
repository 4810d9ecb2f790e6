#!/usr/bin/env bash
# The one prepared check for a lent GPU (an H200): build, GPU tests, memcheck, benchmarks.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh [build] [test] [memcheck] [bench]   # default: all four
#
# Needs only what the device image has (nvcc, torch cu13x, triton, cupy, pybind11, cmake, ninja):
# no network. Builds the extension in place for sm_90a, then
#   test      pytest -m gpu: each CUDA kernel vs its torch reference (fp32/bf16/fp16), Triton
#             kernels, engine vs the golden fixtures on CUDA, graph vs no-graph equality
#   memcheck  compute-sanitizer --tool memcheck over the kernel tests (not the slow ones)
#   bench     DetailFlow-16-size random weights, bf16, batch 1/32/256: engine (graphs and no
#             graphs) vs the reference generation (eager; torch.compile if it compiles in time),
#             with the bandwidth and matmul floors measured in the same run; kernel benchmarks
# Writes at most 4 files to $OUT: gpu_check.log (everything), summary.md (the tables),
# bench_generate.jsonl, and junit-style pass/fail counts inside summary.md.
# Fixtures: $DETAILFLOW_FIXTURES (default tests/fixtures, in the repository).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.md"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(build test memcheck bench)
want() { local p; for p in "${PHASES[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }
T0=$(date +%s)
note() { echo "=== [$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
md() { echo "$*" >> "$SUMMARY"; }
run() {  # run <timeout_s> <label> cmd...: log everything, record the status in the summary
  local limit=$1 label=$2; shift 2
  note "$label: $*"
  local t=$(date +%s)
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t ))
  local what="ok"; [ $rc -ne 0 ] && what="FAILED (exit $rc$([ $rc -eq 124 ] && echo ', timed out'))"
  note "$label: $what in ${took}s"
  md "- $label: $what in ${took}s"
  return $rc
}
# the table lines a command prints also go to the summary
bench_md() {  # bench_md <timeout_s> <title> cmd...
  local limit=$1 title=$2; shift 2
  note "$title: $*"
  md ""; md "### $title"; md ""; md '`'"$*"'`'; md ""
  timeout "$limit" "$@" 2>>"$LOG" | tee -a "$LOG" | grep -E '^(\||#)' >> "$SUMMARY"
  local rc=${PIPESTATUS[0]}
  [ $rc -ne 0 ] && md "" && md "**$title: exit $rc$([ $rc -eq 124 ] && echo ', timed out')**"
  note "$title: exit $rc"
  return 0
}

if [ ! -f "$SUMMARY" ]; then
  md "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
  md ""
  md '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >> "$SUMMARY" 2>&1
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$SUMMARY" 2>&1
  $PY -c "import triton; print('triton', triton.__version__)" >> "$SUMMARY" 2>&1
  md "git $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) uncommitted paths"
  md '```'
  md ""
fi

if want build; then
  md "## Build and tests"; md ""
  rm -f detailflow_engine/_C*.so
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90a -DDETAILFLOW_CUDA_REQUIRED=ON" \
    run 400 "build (setup.py build_ext --inplace, sm_90a)" $PY setup.py -q build_ext --inplace
  $PY -c "import detailflow_engine.ops as o; print(o.build_info())" 2>&1 | tee -a "$LOG" | sed 's/^/    /' >> "$SUMMARY"
fi

if want test; then
  # -W default: torch/triton deprecation warnings on this image must not turn into errors here.
  run 300 "pytest -m gpu" $PY -m pytest -m gpu -q -W default -p no:cacheprovider -rfE tests
  grep -E '^(FAILED|ERROR)|passed|failed' "$LOG" | tail -n 30 | sed 's/^/    /' >> "$SUMMARY"
fi

if want memcheck; then
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  if [ -n "$CS" ]; then
    run 180 "compute-sanitizer memcheck (tests/ops, gpu and not slow)" "$CS" --tool memcheck --error-exitcode 3 \
      --print-limit 20 $PY -m pytest -m "gpu and not slow" -q -x -W default -p no:cacheprovider tests/ops
    grep -E 'ERROR SUMMARY|Invalid|out of bounds|passed|failed' "$LOG" | tail -n 12 | sed 's/^/    /' >> "$SUMMARY"
  else
    md "- compute-sanitizer: not found"
  fi
fi

if want bench; then
  md ""; md "## Benchmarks (DetailFlow-16-size random weights, bf16, CFG 1.45, greedy)"
  J="$OUT/bench_generate.jsonl"
  bench_md 200 "engine (CUDA graphs) vs reference (eager)" \
    $PY benchmarks/bench_generate.py --device cuda --dtype bf16 --batch 1 32 256 --json "$J"
  md ""; md "## Kernels vs their torch composition (CUDA)"
  for op in vq_lookup code_search cache_attention group_sample decode_gemm add_rmsnorm rope_qkv; do
    [ -f "benchmarks/bench_$op.py" ] || continue
    bench_md 45 "$op" $PY "benchmarks/bench_$op.py" --device cuda --quick
  done
  bench_md 90 "engine without CUDA graphs" \
    $PY benchmarks/bench_generate.py --device cuda --dtype bf16 --batch 1 32 256 --no-cuda-graphs --reference none --json "$J"
  bench_md 120 "reference with torch.compile (dynamic=True)" \
    $PY benchmarks/bench_generate.py --device cuda --dtype bf16 --batch 1 32 256 --reference compile --skip-engine --json "$J"
fi
note "done in $(( $(date +%s) - T0 ))s"
md ""; md "total $(( $(date +%s) - T0 ))s"

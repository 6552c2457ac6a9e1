#!/usr/bin/env bash
# The one-shot GPU check, run on a lent GPU machine. GPU time comes in rare, short slots (one command of
# at most 10 minutes, about 15 minutes in all, at most 8 files back), so the script is a plan: tiers in
# order of value, each capped by its budget AND by the time left before a global deadline, skipped with a
# note when too little is left. The plan (tiers, caps, files) is printed by --plan on any machine, and
# tests/test_gpu_check.py keeps it within the limits on CPU.
#
#   bash benchmarks/gpu_check.sh            # run (on the device: OUT=$OUT, NFT_COMMIT=<sha> from the host)
#   bash benchmarks/gpu_check.sh --plan     # print the plan and exit (no GPU needed)
#   DEADLINE_S=300 TIERS="build tests" bash benchmarks/gpu_check.sh
#
# Tiers: env (versions, device, clocks) → build (a GATE: the script stops with the build log's tail if
# the build fails or the CUDA kernels are not registered) → tests (the GPU-relevant tests only, in
# parallel, per-test timeout, junit; a skipped CUDA test counts as a failure) → roofline (CUDA-graph
# replays) → bench (the kernel cases) → memcheck (caching allocator off, our kernels only) → racecheck
# (the fused GEMM) → rest (the fused-routing and split-reduction test reruns, the whole quick benchmark
# suite), each only while time is left. Logs go to a scratch folder and are tarred into $OUT/logs.tar.gz
# after every tier, so a run killed at its limit still returns what finished.
set -uo pipefail
cd "$(dirname "$0")/.."

DEADLINE_S=${DEADLINE_S:-510}
# name:cap_seconds, in the order they run. The caps add up to at most DEADLINE_S.
PLAN="env:10 build:200 tests:110 roofline:60 bench:60 memcheck:30 racecheck:30"
# What comes back under $OUT (the device returns at most 8 files; we use at most 6).
FILES="summary.md logs.tar.gz junit.xml env.json roofline.json bench.json"
# The tests that exercise a GPU: only their CUDA cases run here (-k cuda); CI runs the CPU cases.
GPU_TESTS="tests/test_cuda.py tests/test_rng.py tests/test_perturb.py tests/test_perturb_device.py
 tests/test_noisy_linear.py tests/test_irs_snapshot.py tests/test_layers.py tests/test_sample_axis.py
 tests/test_determinism.py tests/test_error_contract.py tests/test_properties.py tests/test_backend.py
 tests/test_attention.py tests/test_recurrent.py tests/test_eval.py tests/test_device_models.py tests/test_mvm.py
 tests/test_stacked.py"
MIN_TIER_S=15  # a tier with less than this left is skipped, not started

if [ "${1:-}" = "--plan" ]; then
  total=0
  echo "gpu_check plan: deadline ${DEADLINE_S} s"
  for entry in $PLAN; do
    echo "tier ${entry%%:*} cap ${entry##*:} s"
    total=$((total + ${entry##*:}))
  done
  echo "tier rest cap 0 s (only the time left after the planned tiers)"
  echo "planned caps: ${total} s"
  echo "files: $FILES"
  echo "gpu tests: $(echo $GPU_TESTS)"
  exit 0
fi

OUT=${OUT:-out}
PY=${PYTHON:-python3}
TIERS=${TIERS:-"env build tests roofline bench memcheck racecheck rest"}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)
summary="$OUT/summary.md"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
left() { echo $((DEADLINE_S - ($(date +%s) - START))); }
pack() { tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null; }
wanted() { case " $TIERS " in *" $1 "*) return 0;; *) return 1;; esac; }
cap_of() { for entry in $PLAN; do [ "${entry%%:*}" = "$1" ] && echo "${entry##*:}"; done; }
# budget TIER: the seconds the tier may take (its cap, or less when the deadline is nearer); 0 = skip it.
budget() {
  local cap=$(cap_of "$1") rest=$(left) need=$MIN_TIER_S
  [ "$1" = rest ] && cap=$rest
  [ "$cap" -lt "$need" ] && need=$cap  # a tier planned shorter than the minimum needs only its plan
  [ "$1" = rest ] && need=$MIN_TIER_S
  [ "$rest" -lt "$cap" ] && cap=$rest
  if ! wanted "$1"; then echo 0; elif [ "$cap" -lt "$need" ] || [ "$cap" -le 0 ]; then
    # Not through note: this runs inside $(...), whose stdout is the budget.
    echo "- $1: skipped, ${rest} s left before the ${DEADLINE_S} s deadline" | tee -a "$summary" >&2; echo 0
  else echo "$cap"; fi
}
FAILED=""
ran() {
  note "- $1: rc=$2 in $(( $(date +%s) - $3 )) s (cap $4 s)${5:+: $5}"
  [ "$2" -ne 0 ] && FAILED="$FAILED $1"
  pack
}

commit=${NFT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || true)}
if [ -z "$commit" ]; then  # no .git travels to the device: name the tree by its content instead
  commit="unknown (tree sha256 $(find csrc nft_cuda benchmarks tests setup.py -type f \( -name '*.py' -o -name '*.cu' \
    -o -name '*.cpp' -o -name '*.h' -o -name '*.cuh' \) -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16))"
fi
note "# gpu_check $(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit, deadline ${DEADLINE_S} s"

b=$(budget env)
if [ "$b" -gt 0 ]; then
  t=$(date +%s)
  timeout "$b" $PY benchmarks/gpu_env.py --json "$OUT/env.json" > "$LOGS/env.log" 2>&1; rc=$?
  cat "$LOGS/env.log" >> "$summary"
  ran env $rc "$t" "$b"
fi

b=$(budget build)
if [ "$b" -gt 0 ]; then
  t=$(date +%s)
  # In place: no pip metadata needed on the device, and nothing outside the tree is touched.
  timeout "$b" $PY setup.py build_ext --inplace > "$LOGS/build.log" 2>&1; rc=$?
  ran build $rc "$t" "$b"
  if [ $rc -ne 0 ]; then
    note "BUILD FAILED: the rest is not run. Last lines of the build log:"
    tail -n 30 "$LOGS/build.log" | sed 's/^/    /' >> "$summary"
    pack; exit 2
  fi
  $PY - > "$LOGS/registered.log" 2>&1 <<'PY'
import torch
from nft_cuda import _ext
missing = [op for op in _ext.OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"nft_cuda::{op}", "CUDA")]
print("CUDA kernels registered for every op" if not missing else f"no CUDA kernel registered for {missing}")
raise SystemExit(1 if missing else 0)
PY
  rc=$?
  note "- kernels: $(tail -n 1 "$LOGS/registered.log")"
  if [ $rc -ne 0 ]; then note "GATE: the CUDA kernels are not all registered; stopping."; pack; exit 3; fi
fi

b=$(budget tests)
if [ "$b" -gt 0 ]; then
  t=$(date +%s)
  par=""; $PY -c "import xdist" 2>/dev/null && par="-n 8"
  per=""; $PY -c "import pytest_timeout" 2>/dev/null && per="--timeout 60"
  timeout "$b" $PY -m pytest $GPU_TESTS -k cuda -q -p no:cacheprovider $par $per -rfE \
    --junitxml "$OUT/junit.xml" > "$LOGS/tests.log" 2>&1; rc=$?
  verdict=$($PY benchmarks/junit_verdict.py "$OUT/junit.xml" 2>&1); vrc=$?
  [ $rc -eq 0 ] && rc=$vrc
  ran tests $rc "$t" "$b" "$(tail -n 1 "$LOGS/tests.log")"
  echo "$verdict" | head -n 40 | sed 's/^/    /' >> "$summary"
fi

b=$(budget roofline)
if [ "$b" -gt 0 ]; then
  t=$(date +%s)
  timeout "$b" $PY benchmarks/kernel_roofline.py --json "$OUT/roofline.json" > "$LOGS/roofline.md" 2>&1; rc=$?
  ran roofline $rc "$t" "$b"
  cat "$LOGS/roofline.md" >> "$summary"
fi

b=$(budget bench)
if [ "$b" -gt 0 ]; then
  t=$(date +%s)
  # The kernel cases, correctness checked before timing (NFT_CUDA_STRICT=1 inside the suite).
  timeout "$b" $PY -m benchmarks --device cuda --quick --no-compile --only perturb,fused,snapshot \
    --json "$OUT/bench.json" --markdown "$LOGS/bench.md" > "$LOGS/bench.log" 2>&1; rc=$?
  ran bench $rc "$t" "$b"
  [ -s "$LOGS/bench.md" ] && cat "$LOGS/bench.md" >> "$summary"
fi

CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
  b=$(budget $tool)
  [ "$b" -gt 0 ] || continue
  t=$(date +%s)
  # No caching allocator: an out-of-bounds access inside a cached block would go unseen. Our kernels only
  # (a substring of the namespace, in mangled and demangled names alike), bounded output. racecheck: the fused GEMM, the one kernel with shared memory.
  filter="kns=nft_cuda"; [ $tool = racecheck ] && filter="kns=noisy_gemm_kernel"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$b" "$CS" --tool $tool --kernel-name "$filter" --print-limit 20 \
    --error-exitcode 3 $PY benchmarks/sanitizer_case.py > "$LOGS/sanitizer_$tool.log" 2>&1; rc=$?
  ran $tool $rc "$t" "$b" "$(grep -E 'ERROR SUMMARY|not supported' "$LOGS/sanitizer_$tool.log" | tail -n 1)"
done

b=$(budget rest)
if [ "$b" -gt 0 ]; then
  t=$(date +%s)
  # The layers with NoisyLinear routed to the fused kernels, then with the split reduction forced.
  NFT_CUDA_FUSED_LINEAR=1 timeout "$b" $PY -m pytest tests/test_layers.py tests/test_noisy_linear.py \
    tests/test_sample_axis.py -k cuda -q -p no:cacheprovider > "$LOGS/tests_fused.log" 2>&1; rc=$?
  ran "rest(fused-routing)" $rc "$t" "$b" "$(tail -n 1 "$LOGS/tests_fused.log")"
  b=$(budget rest); t=$(date +%s)
  if [ "$b" -gt 0 ]; then
    NFT_CUDA_GEMM_SPLITS=3 NFT_CUDA_FUSED_LINEAR=1 timeout "$b" $PY -m pytest tests/test_noisy_linear.py \
      tests/test_irs_snapshot.py tests/test_cuda.py -k cuda -q -p no:cacheprovider > "$LOGS/tests_split.log" 2>&1; rc=$?
    ran "rest(split-reduction)" $rc "$t" "$b" "$(tail -n 1 "$LOGS/tests_split.log")"
  fi
fi
note "total: $(( $(date +%s) - START )) s of the ${DEADLINE_S} s deadline; tiers that failed:${FAILED:- none}"
pack
[ -z "$FAILED" ]

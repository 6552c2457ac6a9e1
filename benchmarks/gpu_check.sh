#!/usr/bin/env bash
# GPU check, run on a lent GPU machine (see DEVELOPERS notes): builds the extension for the local
# GPU, then in tiers under `timeout`: the full test suite (CUDA tests run, none may skip; again with the
# split reduction forced), a compute-sanitizer pass on a small case, the fused kernels' measured time vs
# their roofline prediction, and the GPU benchmarks. Logs go under $OUT (default ./out).
#   bash benchmarks/gpu_check.sh            # all tiers
#   TIERS="build tests" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
TIERS=${TIERS:-"build tests sanitizer roofline bench"}
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FORCE_CUDA=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary="$OUT/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

note "gpu_check $(date -u '+%Y-%m-%d %H:%M UTC') commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$summary"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$summary"

tier() { case " $TIERS " in *" $1 "*) return 0;; *) return 1;; esac; }

if tier build; then
  start=$(date +%s)
  # In place: no pip metadata needed on the device, and nothing outside the tree is touched.
  timeout 600 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; rc=$?
  note "build: rc=$rc in $(( $(date +%s) - start )) s"
fi

if tier tests; then
  start=$(date +%s)
  timeout 420 $PY -m pytest tests -q -rs -p no:cacheprovider > "$OUT/tests.log" 2>&1; rc=$?
  note "tests: rc=$rc in $(( $(date +%s) - start )) s: $(tail -n 1 "$OUT/tests.log")"
  grep -E "SKIPPED|FAILED|ERROR" "$OUT/tests.log" | head -n 40 >> "$summary"
  # The layers again with NoisyLinear routed to the fused kernels (off by default until verified here).
  start=$(date +%s)
  NFT_CUDA_FUSED_LINEAR=1 timeout 240 $PY -m pytest tests/test_layers.py tests/test_noisy_linear.py tests/test_sample_axis.py \
    -q -rs -p no:cacheprovider > "$OUT/tests_fused_layers.log" 2>&1; rc=$?
  note "tests (NFT_CUDA_FUSED_LINEAR=1): rc=$rc in $(( $(date +%s) - start )) s: $(tail -n 1 "$OUT/tests_fused_layers.log")"
  # The fused GEMM with its split reduction forced (3 parts; the heuristic splits only deep reductions on
  # small grids, which few test shapes are): forward, backward-input and snapshot against the oracles.
  start=$(date +%s)
  NFT_CUDA_GEMM_SPLITS=3 NFT_CUDA_FUSED_LINEAR=1 timeout 240 $PY -m pytest tests/test_noisy_linear.py \
    tests/test_irs_snapshot.py tests/test_cuda.py -q -rs -p no:cacheprovider > "$OUT/tests_split.log" 2>&1; rc=$?
  note "tests (NFT_CUDA_GEMM_SPLITS=3): rc=$rc in $(( $(date +%s) - start )) s: $(tail -n 1 "$OUT/tests_split.log")"
fi

if tier sanitizer; then
  CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck; do
    start=$(date +%s)
    timeout 300 "$CS" --tool "$tool" --error-exitcode 3 $PY benchmarks/sanitizer_case.py > "$OUT/sanitizer_$tool.log" 2>&1; rc=$?
    note "compute-sanitizer $tool: rc=$rc in $(( $(date +%s) - start )) s: $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer_$tool.log" | tail -n 1)"
  done
  start=$(date +%s)  # the split reduction's workspace and second kernel too
  NFT_CUDA_GEMM_SPLITS=3 timeout 300 "$CS" --tool memcheck --error-exitcode 3 $PY benchmarks/sanitizer_case.py \
    > "$OUT/sanitizer_memcheck_split.log" 2>&1; rc=$?
  note "compute-sanitizer memcheck (NFT_CUDA_GEMM_SPLITS=3): rc=$rc in $(( $(date +%s) - start )) s: $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer_memcheck_split.log" | tail -n 1)"
fi

if tier roofline; then
  # Measured time of each fused GEMM case vs its H200 roofline prediction (docs/kernels.md).
  start=$(date +%s)
  timeout 120 $PY benchmarks/kernel_roofline.py --json "$OUT/roofline.json" > "$OUT/roofline.md" 2>&1; rc=$?
  note "roofline (benchmarks/kernel_roofline.py): rc=$rc in $(( $(date +%s) - start )) s"
  cat "$OUT/roofline.md" >> "$summary"
fi

if tier bench; then
  # The peer aihwkit-lightning (optional): the row to beat on a GPU is its Triton path, which the suite
  # times whenever Triton and a Volta-or-newer GPU are present. The device has no network: give its wheel
  # (pip download --no-deps aihwkit-lightning==2.1.0) as PEER_WHEEL=path when it is not installed.
  if ! $PY -c "import aihwkit_lightning" > /dev/null 2>&1 && [ -n "${PEER_WHEEL:-}" ]; then
    $PY -m pip install --no-deps "$PEER_WHEEL" > "$OUT/peer_install.log" 2>&1
  fi
  note "peer: $($PY -c 'from importlib.metadata import version as v; print("aihwkit-lightning", v("aihwkit-lightning"))' 2>/dev/null \
    || echo 'aihwkit-lightning not installed: peer rows skipped'); triton: $($PY -c 'import triton; print(triton.__version__)' 2>/dev/null \
    || echo 'not installed: no Triton peer rows')"
  # The whole suite in quick mode (every case, correctness checked before timing, NFT_CUDA_STRICT=1).
  # Budget 240 s (not yet measured on a GPU: expect cold torch.compile/Triton builds, the peer's too,
  # and the host-side reference baselines to dominate). bench.json / bench.md are rewritten after every
  # case, so a timeout keeps the cases that finished.
  start=$(date +%s)
  timeout 240 $PY -m benchmarks --device cuda --quick --json "$OUT/bench.json" --markdown "$OUT/bench.md" \
    > "$OUT/bench.log" 2>&1; rc=$?
  note "bench (python -m benchmarks --device cuda --quick): rc=$rc in $(( $(date +%s) - start )) s"
  if [ -s "$OUT/bench.md" ]; then cat "$OUT/bench.md" >> "$summary"; else tail -n 60 "$OUT/bench.log" >> "$summary"; fi
fi
cat "$summary"

#!/usr/bin/env bash
# Idempotent set-up used by the README commands and by CI:
#   1. a virtual environment in .venv (override: NFT_VENV) with torch and the demo/test dependencies;
#   2. the style tools (ruff, clang-format) of tools/lint.sh (NFT_SETUP_LINT_ONLY=1: stop after them);
#   3. nft_cuda installed in editable mode with its extension built in place.
# Re-running it installs nothing that is already there and rebuilds the extension only when a
# file under csrc/ or setup.py is newer than the built library (so the test command never rebuilds
# what CI has just built). Build switches (FORCE_CUDA, NFT_CUDA_SKIP_CUDA, TORCH_CUDA_ARCH_LIST, ...)
# are documented in setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${NFT_VENV:-.venv}
TORCH_SPEC=${NFT_TORCH_SPEC:-torch==2.14.1}
# Test dependencies of tests/test_custom_models.py (a timm ViT and a Hugging Face BERT, random weights):
# torchvision is timm's dependency, pinned to the build that matches TORCH_SPEC (override both together:
# NFT_MODEL_LIBS).
MODEL_LIBS=${NFT_MODEL_LIBS:-"torchvision==0.29.1 timm==1.0.31 transformers==5.25.0"}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, numpy, pytest, hypothesis, tqdm, matplotlib, ninja, setuptools, torchvision, timm, transformers" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC and the demo/test dependencies"
  # shellcheck disable=SC2086  # MODEL_LIBS is a list of requirement specifiers
  "$VENV/bin/pip" install -q --disable-pip-version-check "$TORCH_SPEC" numpy pytest hypothesis tqdm matplotlib ninja \
    "setuptools>=64" wheel $MODEL_LIBS 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch; print('[setup] torch', torch.__version__)"
fi
# The peer library of the benchmarks and of the side-by-side tests (tests/test_peer_hwa.py): pure Python;
# its metadata pins an older torch, so without its dependencies (it runs on this torch).
if ! "$VENV/bin/python" -c "import aihwkit_lightning" >/dev/null 2>&1; then
  echo "[setup] installing aihwkit-lightning (the peer, --no-deps)"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps "aihwkit-lightning==2.1.0" 2>&1 \
    | grep -v "^WARNING: Location" || true
fi

# The style tools of tools/lint.sh (pip packages, versions as in .pre-commit-config.yaml).
if ! "$VENV/bin/ruff" --version >/dev/null 2>&1 || ! "$VENV/bin/clang-format" --version >/dev/null 2>&1; then
  echo "[setup] installing ruff and clang-format"
  "$VENV/bin/pip" install -q --disable-pip-version-check "ruff==0.17.6" "clang-format==23.1.5" 2>&1 \
    | grep -v "^WARNING: Location" || true
fi
if [ "${NFT_SETUP_LINT_ONLY:-0}" = "1" ]; then
  exit 0  # .ci/run: only what tools/lint.sh needs, before the build
fi

lib=$(ls nft_cuda/_C*.so 2>/dev/null | head -n 1 || true)
stale=""
if [ -z "$lib" ]; then
  stale="no built extension"
elif [ -n "$(find csrc setup.py -newer "$lib" -print -quit)" ]; then
  stale="sources changed since the last build"
elif ! "$VENV/bin/pip" show -q nft_cuda >/dev/null 2>&1; then
  stale="nft_cuda is not installed in $VENV"
fi
if [ -n "$stale" ]; then
  echo "[setup] building nft_cuda ($stale)"
  start=$(date +%s)
  "$VENV/bin/pip" install --disable-pip-version-check --no-build-isolation --no-deps -v -e . > build.log 2>&1 || {
    grep -E "error|nft_cuda setup" build.log | tail -n 40; echo "[setup] build failed: see build.log"; exit 1; }
  grep "nft_cuda setup" build.log | sed 's/^ *//' | sort -u
  echo "[setup] built in $(( $(date +%s) - start )) s (log: build.log)"
else
  echo "[setup] nft_cuda is built and up to date ($lib)"
fi

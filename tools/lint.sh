#!/usr/bin/env bash
# Fast style check (seconds): ruff lint, ruff format --check, clang-format --dry-run over csrc/.
# Run by .ci/run before the build and by the pre-commit hooks. To fix what it reports:
#   ruff format . && ruff check --fix . && clang-format -i $(git ls-files 'csrc/*')
# Tools: RUFF / CLANG_FORMAT override the commands (default: .venv/bin/ruff, then ruff on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

pick() {  # first runnable of the candidates
  for c in "$@"; do
    if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1; then echo "$c"; return; fi
  done
  echo "[lint] none of: $* (install with: pip install ruff clang-format)" >&2
  exit 1
}
RUFF=$(pick "${RUFF:-}" .venv/bin/ruff ruff)
CLANG_FORMAT=$(pick "${CLANG_FORMAT:-}" .venv/bin/clang-format clang-format)

status=0
echo "[lint] $("$RUFF" --version): check"
"$RUFF" check --no-cache . || status=1
echo "[lint] ruff format --check"
"$RUFF" format --no-cache --check . || status=1
mapfile -t cxx < <(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 2>/dev/null ||
                   find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')
echo "[lint] $("$CLANG_FORMAT" --version | head -n 1): ${#cxx[@]} files"
"$CLANG_FORMAT" --dry-run -Werror "${cxx[@]}" || status=1
if [ "$status" -ne 0 ]; then
  echo "[lint] FAILED: fix with: ruff format . && ruff check --fix . && clang-format -i \$(git ls-files 'csrc/*')"
fi
exit "$status"

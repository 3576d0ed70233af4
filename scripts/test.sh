#!/usr/bin/env bash
# The test command: sets up the venv if needed, lints (ruff, import-linter's layer contracts), runs the whole
# suite on CPU.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/model -k itc`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=setup_env.sh
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
echo "[test] ruff"
ruff check .
echo "[test] lint-imports (layer contracts, pyproject.toml)"
bash scripts/lint_imports.sh
echo "[test] pytest"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python -m pytest -q -p no:cacheprovider "$@"

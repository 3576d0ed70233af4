#!/usr/bin/env bash
# The layer contracts of pyproject.toml ([tool.importlinter]) checked with import-linter on the package as it
# installs: kernels/ and launcher/ become albef_ds.kernels and albef_ds.launcher (setup.py package_dir), which
# import-linter cannot see in the checkout (it walks the albef_ds/ folder only). So the installed layout is
# laid out in a temporary folder (a copy of the sources, no build) and checked there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp -r "$ROOT/albef_ds" "$tmp/albef_ds"
# A development checkout may hold albef_ds/kernels and albef_ds/launcher as symlinks to the top-level folders.
rm -rf "$tmp/albef_ds/kernels" "$tmp/albef_ds/launcher"
cp -r "$ROOT/kernels" "$tmp/albef_ds/kernels"
cp -r "$ROOT/launcher" "$tmp/albef_ds/launcher"
cp "$ROOT/pyproject.toml" "$tmp/"
cd "$tmp"
PYTHONPATH="$tmp" lint-imports --no-cache --config "$tmp/pyproject.toml" "$@"

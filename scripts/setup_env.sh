#!/usr/bin/env bash
# Creates (once) and activates the project venv; sourced by scripts/test.sh and scripts/demo.sh.
# Idempotent: a stamp holding the hash of requirements.txt + setup.py makes a second run take seconds.
# torch==2.14.1 and torchvision==0.29.1 install from this machine's disk (pip's find-links); the rest from PyPI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ALBEF_DS_VENV:-$HOME/.cache/albef-ds/venv}"
PY="${ALBEF_DS_PYTHON:-python3}"
want="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-deepspeed.txt" "$ROOT/setup.py" | sha256sum | cut -c1-16)"
stamp="$VENV/.albef-ds-stamp"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] creating venv at $VENV (first run: about 2 minutes)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation \
    -r "$ROOT/requirements-deepspeed.txt" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  "$VENV/bin/python" -c "import torch, torchvision, timm, transformers, deepspeed" \
    || { echo "[setup] the venv at $VENV is broken; remove it and run again" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
# Editable install of *this* checkout (cheap; also re-points the venv when several clones share it).
# Asked from / so that a checkout in the current folder cannot answer for the installed one.
installed="$(cd / && "$VENV/bin/python" -c 'import albef_ds, os; print(os.path.dirname(os.path.dirname(albef_ds.__file__)))' 2>/dev/null || true)"
if [ "$installed" != "$ROOT" ] || ! (cd / && "$VENV/bin/python" -c 'import albef_ds.kernels, albef_ds.launcher' 2>/dev/null); then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"

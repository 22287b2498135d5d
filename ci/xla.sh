#!/usr/bin/env bash
# The XLA backend's tests in their own venv (outside the checkout, so CI clones reuse it): torch_xla 2.9.0 needs exactly torch 2.9.0, whose PyPI
# build pulls ~4 GB of CUDA libraries (unused here; pip caches them). SPMD runs on 4 CPU virtual devices.
# The venv is made once and reused; the package is reinstalled (no deps, seconds) only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${XLA_VENV:-$HOME/.cache/mixtral-run/venv-xla}  # override to build elsewhere
PIP=(python -m pip install --quiet --disable-pip-version-check)
STAMP="$VENV/.mixtral-installed"
WANT="torch==2.9.0 torch_xla==2.9.0 $(pwd) $(sha256sum pyproject.toml | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    python3.11 -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    (
        source "$VENV/bin/activate"
        "${PIP[@]}" torch==2.9.0 torch_xla==2.9.0 pluggy safetensors sentencepiece mistral-common numpy pyyaml tqdm pytest
        "${PIP[@]}" --no-deps -e .
    )
    echo "$WANT" > "$STAMP"
fi
PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 TF_CPP_MIN_LOG_LEVEL=2 "$VENV/bin/python" -m pytest -q tests/xla "$@"

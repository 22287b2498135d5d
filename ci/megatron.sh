#!/usr/bin/env bash
# Interoperability with the real megatron-core 0.19.2 in its own venv (outside the checkout, so CI clones reuse it):
# tests/megatron builds megatron-core's GPTModel on the CPU and loads, saves and converts torch_dist checkpoints.
# megatron-core is installed without dependency resolution: its wheel asks for a newer Python than its code needs;
# it imports torch, numpy, packaging and triton, and its torch_dist save needs psutil. The venv is made once and
# reused; the package is reinstalled (no deps, seconds) only when pyproject.toml or this list changes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEGATRON_VENV:-$HOME/.cache/mixtral-run/venv-megatron}  # override to build elsewhere
PIP=(python -m pip install --quiet --disable-pip-version-check)
DEPS=(torch==2.13.0 pluggy safetensors sentencepiece mistral-common numpy pyyaml tqdm matplotlib huggingface_hub
      "transformers>=5.25" pytest packaging triton psutil)
MEGATRON=megatron-core==0.19.2
STAMP="$VENV/.mixtral-installed"
WANT="${DEPS[*]} $MEGATRON $(pwd) $(sha256sum pyproject.toml | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    python3.11 -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    (
        source "$VENV/bin/activate"
        "${PIP[@]}" "${DEPS[@]}"
        "${PIP[@]}" --no-deps --ignore-requires-python "$MEGATRON"
        "${PIP[@]}" --no-deps -e .
    )
    echo "$WANT" > "$STAMP"
fi
"$VENV/bin/python" -m pytest -q tests/megatron "$@"

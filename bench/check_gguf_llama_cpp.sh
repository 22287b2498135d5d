#!/usr/bin/env bash
# Builds llama-cpp-python (llama.cpp itself, compiled for this CPU; pip caches the wheel) and runs the GGUF checks
# against it: tokenizer ids, 32 greedy tokens equal to ours in fp32, BF16 and Q8_0 loading and generating.
#   bash bench/check_gguf_llama_cpp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check gguf llama-cpp-python
python -m pytest -q -rs tests/test_gguf.py

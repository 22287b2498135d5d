#!/usr/bin/env bash
# Installs the package with its test extra. torch is pinned to the CPU build on this machine's disk,
# so pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check torch==2.13.0 -e ".[test]"

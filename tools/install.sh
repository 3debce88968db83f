#!/usr/bin/env bash
# Set-up for a fresh machine: torch (the CUDA 13.0 build where available), build tools, and this package
# built in place (editable) with its test extras. CUDA kernels are compiled when a CUDA toolkit is found.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.14.1" ninja pybind11 numpy
python -m pip install -q --no-build-isolation -e ".[test]"

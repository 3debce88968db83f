#!/usr/bin/env bash
# Incremental in-place build of codellama_ext._C for development (ninja; only changed files recompile).
# Serialised with a lock so several developers in one checkout never build at once.
# TORCH_CUDA_ARCH_LIST defaults to 9.0 here to keep rebuilds short; the package default is wider.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
exec flock /tmp/codellama_ext_build.lock python setup.py build_ext --inplace "$@"

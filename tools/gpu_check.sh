#!/usr/bin/env bash
# The checks for a lent GPU machine: build the extension in place (sm_90 by default), run every CUDA test
# case, the generation and kernel benchmarks, a profile of the 7B decode step and the serving benchmarks. Each
# stage has its own time limit so a hang in one still leaves the others' results; tests run in pytest-xdist
# workers so a crash fails one test, not the run. Logs land in $OUT (the device tool's folder) or build/gpu-check.
#   bash tools/gpu_check.sh                          # every stage (the env is always printed)
#   STAGES="build tests gen bench profile" bash tools/gpu_check.sh; STAGES=serve bash tools/gpu_check.sh
# On an H200 (session 12) build took 43-49 s, tests 34-40 s, gen 55-59 s, bench 8-10 s, profile 28 s, serve 118 s
# (with the concurrency bench cut at 70 s, before its 8-client row: it now gets 150 s): two calls fit one device
# budget; the in-place build stays between calls on the same warm machine. profile now runs eight times (~14 s each).
# gen writes a random 7B-shaped checkpoint (13.5 GB fp16) into $GEN_WORKDIR (/tmp/bg) and times ours against
# transformers; profile splits a 7B decode step's GPU time by kernel (tools/profile_decode.py); serve times
# prompt lookup on the embedded default model (one row, then batches of 4), concurrent clients
# (tools/bench_concurrency.py, 1.1B-shaped fp16) and a 4096-token prompt joining a stream in parts
# (tools/bench_prefill_chunks.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/build/gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
PY="${PYTHON:-python3}"
# The lent machines set CC / CXX to a wrapper in /opt/gcc; an extension built through it segfaults inside
# libstdc++'s ostream (seen in a backtrace: the module carries its own copy) as soon as an error message is
# formatted. Build with the distribution's compiler itself unless CODELLAMA_KEEP_CXX is set.
if [ -z "${CODELLAMA_KEEP_CXX:-}" ]; then
  for cxx in /usr/bin/x86_64-linux-gnu-g++-13 /usr/bin/g++-13 /usr/bin/g++; do
    if [ -x "$cxx" ]; then export CXX="$cxx" CC="${cxx/g++/gcc}"; break; fi
  done
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda,
    'capability', torch.cuda.get_device_capability() if torch.cuda.is_available() else None)"  # 9.x: PDL on
  nvcc --version | tail -1; echo "CC=${CC:-} CXX=${CXX:-}"; "${CXX:-g++}" --version | head -1
  ls -l /opt/gcc/bin/ /usr/bin/g++* /usr/bin/x86_64-linux-gnu-g++* 2>&1 | head; head -c 400 /opt/gcc/bin/g++ | strings | head; } 2>&1 | tee "$OUT/env.txt"

STAGES=" ${STAGES:-build tests gen bench profile serve} "
stage() { [[ "$STAGES" == *" $1 "* ]]; }

if stage build; then
  start=$(date +%s)
  timeout "${BUILD_S:-240}" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  rc=$?; echo "build rc=$rc in $(( $(date +%s) - start )) s"
  if [ $rc -ne 0 ]; then grep -E "error|Error" "$OUT/build.log" | head -40; tail -20 "$OUT/build.log"; exit 1; fi
fi

if stage tests; then
  start=$(date +%s)
  # -v: each case's result lands in the log as it finishes, so a run cut by the time limit still names them.
  timeout "${TEST_S:-150}" "$PY" -m pytest -v -k cuda -p no:cacheprovider --continue-on-collection-errors \
    -n "${TEST_WORKERS:-8}" -rfE tests >"$OUT/tests.log" 2>&1
  grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$OUT/tests.log" | head -60
  echo "tests: $(grep -c ' PASSED' "$OUT/tests.log") passed, $(grep -c ' FAILED' "$OUT/tests.log") failed lines; took $(( $(date +%s) - start )) s"
fi

if stage gen; then
  start=$(date +%s)
  mkdir -p "${GEN_WORKDIR:-/tmp/bg}"
  timeout "${GEN_S:-240}" "$PY" tools/bench_generate.py --device cuda --shape ${GEN_SHAPES:-7b} --batch 1 8 \
    --new-tokens 64 --prefill 128 2048 --workdir "${GEN_WORKDIR:-/tmp/bg}" 2>&1 | tee "$OUT/bench_generate.log"
  echo "generation bench took $(( $(date +%s) - start )) s"
fi

if stage bench; then
  start=$(date +%s)
  timeout "${BENCH_S:-120}" "$PY" tools/bench_kernels.py --device cuda 2>&1 | tee "$OUT/bench.log"
  echo "bench took $(( $(date +%s) - start )) s"
fi

if stage profile; then
  # programmatic dependent launch (codellama/launch.h) as shipped, then off, then with other L2 prefetch sizes; the
  # wo prefetch during attention without and with a long context (whose K / V reads may evict it from L2)
  for run in "|" "|--quantize int8" "CODELLAMA_PDL=0|" "CODELLAMA_L2_PREFETCH_MB=0|" "CODELLAMA_L2_PREFETCH_MB=32|" \
      "CODELLAMA_L2_PREFETCH_ATTENTION_MB=0|" "|--pos 4000" "CODELLAMA_L2_PREFETCH_ATTENTION_MB=0|--pos 4000"; do
    echo "== ${run%%|*} ${run#*|}" | tee -a "$OUT/profile.log"
    env ${run%%|*} timeout "${PROFILE_S:-60}" "$PY" tools/profile_decode.py --shape 7b --dtype float16 ${run#*|} \
      2>&1 | grep -v "profiler.py\|_warn_once\|^USDT\|^ERROR\|^STAGE" | head -16 | tee -a "$OUT/profile.log"
  done
fi

if stage serve; then
  start=$(date +%s)
  timeout "${LOOKUP_S:-90}" "$PY" tools/bench_prompt_lookup.py --device cuda 2>&1 | tee "$OUT/bench_prompt_lookup.log"
  timeout "${LOOKUP_S:-90}" "$PY" tools/bench_prompt_lookup.py --device cuda --batch 4 --draft 4 --no-hf 2>&1 \
    | tee -a "$OUT/bench_prompt_lookup.log"
  timeout "${CONC_S:-150}" "$PY" tools/bench_concurrency.py --device cuda --dtype float16 --clients 4 8 \
    --new-tokens 64 2>&1 | tee "$OUT/bench_concurrency.log"
  timeout "${CHUNK_S:-60}" "$PY" tools/bench_prefill_chunks.py --device cuda --dtype float16 --long 4096 \
    --new-tokens 64 --chunks 256 512 1024 2>&1 | tee "$OUT/bench_prefill_chunks.log"
  echo "serving benches took $(( $(date +%s) - start )) s"
fi

"""The serving benchmarks and the decode profiler in tools/ run end to end on a small random model and print their
tables (their numbers are for benchmarks/RESULTS.md, not asserted here: speed is not tested)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(tool: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), "--shape", "small", "--dtype", "float32",
                          *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("tool,args,rows", [
    ("bench_concurrency.py", ["--clients", "2", "--requests", "1", "--new-tokens", "3", "--prompt", "8"], ["2"]),
    ("bench_prefill_chunks.py", ["--long", "40", "--new-tokens", "8", "--chunks", "8", "--repeats", "1"],
     ["whole", "8"]),
    ("bench_shared_prefix.py", ["--prompt", "40", "--repeats", "1"], ["copied", "each prefilled", "transformers"]),
])
def test_serving_benchmarks_run(tool, args, rows):
    out = run_tool(tool, *args)
    table = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for row in rows:
        assert re.search(r"\d+\.\d+", table[row]), out
    if tool == "bench_shared_prefix.py":  # float32: copying a prefix gives the ids of recomputing it
        assert "ids equal" in out


@pytest.mark.parametrize("quantize", [[], ["--quantize", "int8"]])
def test_profile_decode_runs(quantize):
    out = run_tool("profile_decode.py", "--device", "cpu", "--steps", "2", *quantize)
    assert re.search(r"eager step \d+\.\d+ ms", out), out
    table = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "codellama::decoder_layers" in table and ("codellama::linear_int8" if quantize else "codellama::linear") \
        in table, out

"""Generation benchmark: our generate against transformers' on the same random-weight checkpoint, in the same run.

    PYTHONPATH=. python tools/bench_generate.py [--shape 1.1b] [--dtype bfloat16] [--batch 1 8] [--prefill 128 2048] ...

The same command as `codellama-ext bench` (its code: codellama_ext/benchmark.py; flags: --help). Prints a
markdown table; paste it into benchmarks/RESULTS.md with the machine, date and command.
"""

from __future__ import annotations

import sys

from codellama_ext.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

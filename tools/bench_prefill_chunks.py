"""A long prompt arriving while another row decodes (Engine.prefill_chunk): one row streams N greedy tokens; after
its K-th token a prompt of L tokens joins the run (Run.add, as a concurrent call does). Prefilled whole, that
prompt stalls the streaming row for its whole prefill; in parts of prefill_chunk tokens per step, the streaming row
gets a token every step and the long prompt's first token comes a little later. One random-weight checkpoint
(codellama_ext.benchmark.write_random_meta), each setting run --repeats times, alternated, in one process.

    PYTHONPATH=. python tools/bench_prefill_chunks.py [--shape 1.1b] [--dtype bfloat16] [--device cpu]
                                                      [--long 512] [--new-tokens 48] [--chunks 32 64 128]

Per setting (whole = prefill_chunk None, our behaviour before parts): the streaming row's worst gap between two
tokens and its time to its last token, and the long prompt's time from joining to its first token; medians over
the repeats. transformers' generate has no way to take a request into a generation in progress (a second request
waits for the first to end), so no peer runs here. Paste the table into benchmarks/RESULTS.md with the machine,
date and command.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from codellama_ext.benchmark import add_random_model_arguments, random_model
from codellama_ext.generation import Engine, SamplingParams


def one_run(engine: Engine, short: list[int], long: list[int], new: int, join_after: int) -> tuple[float, ...]:
    """(worst gap of the streaming row, its time to the last token, the long prompt's time to its first token)."""
    run = engine.run([short], SamplingParams(max_new_tokens=new), [])
    gaps, joined, first_long, t0 = [], None, None, time.perf_counter()
    last = t0
    for i, step in enumerate(run):
        now = time.perf_counter()
        if any(r == 0 for r, _ in step):
            gaps.append(now - last)
            last = now
        if joined is not None and first_long is None and any(r == 1 for r, _ in step):
            first_long = now - joined
        if i + 1 == join_after:
            run.add([long], SamplingParams(max_new_tokens=4), [])
            joined = time.perf_counter()
    return max(gaps[join_after:]), last - t0, first_long


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_random_model_arguments(ap)
    ap.add_argument("--long", type=int, default=512, help="tokens of the prompt that joins")
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens the streaming row generates")
    ap.add_argument("--join-after", type=int, default=4, help="the long prompt joins after this many tokens")
    ap.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    rng = random.Random(0)
    model, args, _ = random_model(a, max_batch_size=2, max_seq_len=max(a.long + 8, 16 + a.new_tokens))
    engine = Engine(model, prefix_cache=False)
    default = engine.prefill_chunk
    short = [1] + [rng.randrange(3, args.vocab_size) for _ in range(15)]
    long = [1] + [rng.randrange(3, args.vocab_size) for _ in range(a.long - 1)]
    settings = [None] + a.chunks
    one_run(engine, short, long[:64], 8, 2)  # warm-up
    times: dict = {s: [] for s in settings}
    for _ in range(a.repeats):
        for s in settings:
            engine.prefill_chunk = s
            times[s].append(one_run(engine, short, long, a.new_tokens, a.join_after))
    print(f"# bench_prefill_chunks: {a.shape} {a.dtype} on {a.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; a {a.long}-token prompt joins after token {a.join_after} of "
          f"{a.new_tokens}; medians of {a.repeats}; default prefill_chunk here: {default}")
    print("| prefill_chunk | streaming row: worst gap (s) | streaming row: last token (s) | long prompt: first "
          "token (s) | worst gap / whole's | first token / whole's |")
    print("|---|---|---|---|---|---|")
    whole = [statistics.median(x) for x in zip(*times[None])]
    for s in settings:
        gap, end, first = (statistics.median(x) for x in zip(*times[s]))
        print(f"| {'whole' if s is None else s} | {gap:.2f} | {end:.2f} | {first:.2f} | {gap / whole[0]:.2f}x | "
              f"{first / whole[2]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

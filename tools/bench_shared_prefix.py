"""n samples of one prompt (OpenAI's "n", a completion UI's several suggestions): our engine prefills the prompt
once and copies its keys and values into the other rows' cache slots (Engine.place); without prefix reuse
(prefix_cache=False) each row prefills it; transformers' generate(num_return_sequences=n) prefills n copies as one
batch. Seeded sampling, N new tokens per sample, one random-weight checkpoint
(codellama_ext.benchmark.write_random_meta), each setting --repeats times, alternated, in one process.

    PYTHONPATH=. python tools/bench_shared_prefix.py [--shape 1.1b] [--dtype bfloat16] [--device cpu] [--n 4]
                                                     [--prompt 256] [--new-tokens 8] [--repeats 2] [--no-hf]

Prints the wall time of the whole call (medians) and the ratios. Paste the table into benchmarks/RESULTS.md with the
machine, date and command.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from codellama_ext.benchmark import add_random_model_arguments, random_model
from codellama_ext.generation import Engine, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_random_model_arguments(ap)
    ap.add_argument("--n", type=int, default=4, help="samples of the prompt")
    ap.add_argument("--prompt", type=int, default=256, help="prompt length (random ids)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    a = ap.parse_args()
    rng = random.Random(0)
    model, args, hf = random_model(a, max_batch_size=a.n, max_seq_len=a.prompt + a.new_tokens + 1,
                                   with_hf=not a.no_hf)
    prompt = [1] + [rng.randrange(3, args.vocab_size) for _ in range(a.prompt - 1)]
    sp = SamplingParams(max_new_tokens=a.new_tokens, temperature=0.8, top_p=0.95, seed=0)
    engines = {"copied": Engine(model), "each prefilled": Engine(model, prefix_cache=False)}

    def ours(engine: Engine) -> list:
        model.reset_cache()  # nothing left from the last repetition: the copies come from this call's first row
        return [r.tokens for r in engine.generate([prompt] * a.n, sp, [])]

    def theirs():
        x = torch.tensor([prompt], device=a.device)
        with torch.inference_mode():
            return hf.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=0.8, top_p=0.95,
                               top_k=None, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                               num_return_sequences=a.n, pad_token_id=0)
    runs = {name: (lambda e=e: ours(e)) for name, e in engines.items()}
    if hf is not None:
        runs["transformers"] = theirs
    ours(engines["copied"])  # warm-up
    times: dict = {name: [] for name in runs}
    ids = {}
    for _ in range(a.repeats):
        for name, run in runs.items():
            t = time.perf_counter()
            ids[name] = run()
            times[name].append(time.perf_counter() - t)
    same = ids["copied"] == ids["each prefilled"]
    print(f"# bench_shared_prefix: {a.shape} {a.dtype} on {a.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {a.n} samples of a {a.prompt}-token prompt, {a.new_tokens} new tokens "
          f"each (seeded sampling); medians of {a.repeats}; copied and each-prefilled ids "
          f"{'equal' if same else 'differ (16-bit: a prompt prefilled alone or in a batch rounds differently, '}"
          f"{'' if same else 'and near-ties of the random model flip)'}")
    print("| setting | whole call (s) | time / copied |")
    print("|---|---|---|")
    base = statistics.median(times["copied"])
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {statistics.median(ts) / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

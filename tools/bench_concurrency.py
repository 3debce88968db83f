"""Concurrent requests on one model (codellama_ext/batching.py): C client threads each send R greedy requests of N
new tokens (no stop id), one after another, all clients starting at the same moment; against the same clients
served one request at a time (a lock around the call: what a lock per model gives) by our engine and by
transformers' generate. One random-weight checkpoint (codellama_ext.benchmark.write_random_meta), one run.

    PYTHONPATH=. python tools/bench_concurrency.py [--shape 1.1b] [--dtype bfloat16] [--clients 4 8] [--requests 2]
                                                   [--new-tokens 32] [--prompt 64] [--device cpu] [--no-hf]

Per client count: the throughput (all new tokens / the wall time from the start to the last answer) and the
latency of a request (from its sending to its answer, waiting for the lock included; median and worst). Every
prompt differs (random ids), prefix reuse is off. The ids of ours batched are compared with ours one at a time:
in 16-bit a batch can flip a near-tie (random weights give flat logits), so a difference is reported, not an
error. Paste the table into benchmarks/RESULTS.md with the machine, date and command.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import threading
import time

import torch

from codellama_ext import CodeLlama, CodeLlamaTokenizer
from codellama_ext.api import DEFAULT_MODEL_DIR
from codellama_ext.benchmark import add_random_model_arguments, random_model


def clients(generate, requests: list[list[list[int]]], lock: threading.Lock | None = None):
    """(wall seconds, latency per request, ids per request): client c sends requests[c] one after another, all
    clients at once; with a lock, one request is served at a time."""
    latencies, ids, start = [], {}, threading.Barrier(len(requests) + 1)

    def client(c):
        start.wait()
        for i, p in enumerate(requests[c]):
            t = time.perf_counter()
            with lock or contextlib.nullcontext():
                ids[c, i] = generate(p)
            latencies.append(time.perf_counter() - t)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(requests))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, latencies, [ids[c, i] for c in range(len(requests))
                                                 for i in range(len(requests[c]))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_random_model_arguments(ap)
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--requests", type=int, default=2, help="requests per client, sent one after another")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64, help="prompt length (random ids)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    a = ap.parse_args()
    rng = random.Random(0)
    model, _, hf = random_model(a, max_batch_size=max(a.clients), max_seq_len=a.prompt + a.new_tokens + 1,
                                with_hf=not a.no_hf)
    # the default model's tokenizer: generate() needs one (its ids, below 4112, fit every shape's vocabulary)
    llm = CodeLlama(model, CodeLlamaTokenizer(str(DEFAULT_MODEL_DIR / "tokenizer.model")), prefix_cache=False)
    vocab = llm.tokenizer.n_words

    def ours(p: list[int]) -> list[int]:
        return llm.generate([p], max_new_tokens=a.new_tokens, stop_ids=[])[0].tokens

    def theirs(p: list[int]):
        x = torch.tensor([p], device=a.device)
        with torch.inference_mode():
            return hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=a.new_tokens,
                               min_new_tokens=a.new_tokens, pad_token_id=0, temperature=None, top_p=None, top_k=None)
    ours([1, 2, 3])  # warm-up
    print(f"# bench_concurrency: {a.shape} {a.dtype} on {a.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {a.requests} request(s) per client, prompt {a.prompt} ids, "
          f"{a.new_tokens} new tokens, greedy")
    print("| clients | ours batched (tok/s) | ours one at a time (tok/s) | transformers one at a time (tok/s) "
          "| batched / one at a time | batched / transformers | latency median / worst: batched, one at a time "
          "(s) |")
    print("|---|---|---|---|---|---|---|")
    for c in a.clients:
        requests = [[[1] + [rng.randrange(3, vocab) for _ in range(a.prompt - 1)] for _ in range(a.requests)]
                    for _ in range(c)]
        n_req = c * a.requests
        tokens = n_req * a.new_tokens
        wall, lat, ids = clients(ours, requests)
        s_wall, s_lat, s_ids = clients(ours, requests, threading.Lock())
        same = sum(x == y for x, y in zip(ids, s_ids))
        peer = None if hf is None else tokens / clients(theirs, requests, threading.Lock())[0]
        print(f"| {c} | {tokens / wall:.1f} | {tokens / s_wall:.1f} | {'' if peer is None else f'{peer:.1f}'} | "
              f"{s_wall / wall:.2f}x | {'' if peer is None else f'{tokens / wall / peer:.2f}x'} | "
              f"{statistics.median(lat):.2f} / {max(lat):.2f}, {statistics.median(s_lat):.2f} / {max(s_lat):.2f} |"
              + ("" if same == n_req else f" ids differ in {n_req - same}/{n_req} requests"), flush=True)


if __name__ == "__main__":
    main()

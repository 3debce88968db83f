"""Prompt-lookup decoding benchmark: greedy completion of real code with and without drafts copied from the text,
ours (SamplingParams.prompt_lookup) against transformers' generate (prompt_lookup_num_tokens) on the same weights.

    PYTHONPATH=. python tools/bench_prompt_lookup.py [--model FOLDER] [--draft 4 8] [--new-tokens 64] ...

Prompts: the first --lines lines of each of this repository's own Python files (code the embedded default model,
trained on the Python standard library, never saw). Every completion runs for exactly --new-tokens tokens (no
stop id). "same": the prompts whose tokens equal plain greedy's (all, in float32; in 16-bit a draft checked in a
multi-token forward can flip a near-tie of one unit in the last place, as a different batch can); decode tokens/s
= the new tokens after the first / the time from the first to the last (prefill excluded).
"accepted": the share of those tokens that came from a confirmed draft. --batch B generates B prompts together
(each row drafts for itself; transformers' prompt lookup takes one row, so its column then shows its plain batched
greedy only, in the draft 0 row). Paste the table into
benchmarks/RESULTS.md with the machine, date and command.
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import torch

from codellama_ext import CodeLlama, SamplingParams
from codellama_ext.api import DEFAULT_MODEL_DIR
from codellama_ext.benchmark import hf_from_meta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prompts(tokenizer, lines: int) -> list[list[int]]:
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "codellama_ext", "*.py"))):
        with open(path, encoding="utf-8") as f:
            head = "".join(f.readlines()[:lines])
        out.append(tokenizer.encode_meta(head, bos=True, eos=False))
    return out


def batches(ids: list[list[int]], batch: int) -> list[list[list[int]]]:
    return [ids[i:i + batch] for i in range(0, len(ids), batch)]


def ours(llm: CodeLlama, ids: list[list[int]], n: int, draft: int,
         batch: int) -> tuple[float, int, list[list[int]], int]:
    """(decode seconds, decode tokens, tokens per prompt, accepted draft tokens) of greedy completions of n tokens
    each, `batch` prompts per run: the time from the first new tokens to the last (the engine yields every token
    of a row as its own step)."""
    seconds, results = 0.0, []
    for group in batches(ids, batch):
        run = llm.engine.run(group, SamplingParams(max_new_tokens=n, prompt_lookup=draft), stop_ids=[])
        stamps = [time.perf_counter() for _ in run]
        seconds += stamps[-1] - stamps[0]
        results += run.results
    return seconds, len(ids) * (n - 1), [r.tokens for r in results], sum(r.accepted_drafts for r in results)


class _Stamps:
    """transformers' streamer protocol: put(prompt ids), then put(new ids) after each forward."""

    def __init__(self):
        self.times, self.counts = [], []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        self.counts.append(value.numel())

    def end(self) -> None:
        pass


def theirs(model, ids: list[list[int]], n: int, draft: int, device: str, eos: int,
           batch: int) -> tuple[float, int]:
    """(decode seconds, decode tokens): from the end of the forward that gave the first new token(s) to the last.
    Batches are left-padded, as transformers' generate needs."""
    seconds, tokens = 0.0, 0
    for group in batches(ids, batch):
        width = max(map(len, group))
        x = torch.tensor([[0] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        clock = _Stamps()
        with torch.inference_mode():
            model.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=0, eos_token_id=eos, temperature=None, top_p=None,
                           top_k=None, prompt_lookup_num_tokens=draft or None, streamer=clock)
        seconds += clock.times[-1] - clock.times[1]
        tokens += sum(clock.counts[2:])
    return seconds, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="model folder (default: the embedded model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--draft", type=int, nargs="+", default=[4, 8], help="draft lengths to compare with 0")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--lines", type=int, default=30, help="lines of each file in its prompt")
    ap.add_argument("--prompts", type=int, default=None, help="use the first N files only (default: all)")
    ap.add_argument("--batch", type=int, default=1, help="prompts generated together")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    llm = CodeLlama.from_pretrained(a.model, device=a.device, dtype=dtype, max_seq_len=2048, max_batch_size=a.batch,
                                    prefix_cache=False)  # each completion prefills its whole prompt
    ids = prompts(llm.tokenizer, a.lines)[:a.prompts]
    hf = None if a.no_hf else hf_from_meta(a.model, dtype, a.device)
    ours(llm, ids[:a.batch], 4, 0, a.batch)  # warm-up
    print(f"# bench_prompt_lookup: {os.path.basename(os.path.abspath(a.model))}, {a.device} {a.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(ids)} prompts of {a.lines} lines "
          f"(mean {sum(map(len, ids)) / len(ids):.0f} tokens), {a.new_tokens} new tokens each, greedy, batch {a.batch}")
    print("| draft | ours (decode tok/s) | accepted | same | ours vs no draft | transformers (decode tok/s) "
          "| ours / transformers |")
    print("|---|---|---|---|---|---|---|")
    base_rate = None
    for draft in [0, *a.draft]:
        s, n_tok, tokens, accepted = ours(llm, ids, a.new_tokens, draft, a.batch)
        base_tokens = tokens if draft == 0 else base_tokens
        base_rate = n_tok / s if draft == 0 else base_rate
        same = sum(t == b for t, b in zip(tokens, base_tokens))
        peer = None
        if hf is not None and (a.batch == 1 or draft == 0):
            peer_s, peer_tok = theirs(hf, ids, a.new_tokens, draft, a.device, llm.tokenizer.eos_id, a.batch)
            peer = peer_tok / peer_s
        print(f"| {draft} | {n_tok / s:.1f} | {100 * accepted / n_tok:.0f}% | {same}/{len(ids)} | "
              f"{n_tok / s / base_rate:.2f}x | {'' if peer is None else f'{peer:.1f}'} | "
              f"{'' if peer is None else f'{n_tok / s / peer:.2f}x'} |", flush=True)


if __name__ == "__main__":
    main()

"""Generation benchmark (issue 5): our generation engine (what `CodeLlama.generate` runs) against transformers'
`generate` on the same random-weight checkpoint, in the same run.

    codellama-ext bench [--shape 1.1b] [--dtype bfloat16] [--batch 1 8] [--prefill 128 2048] [--no-int8] ...
    python tools/bench_generate.py ...           (the same command, the same flags)

For each shape and dtype a random-weight Meta folder (params.json + consolidated.00.pth) is written to a temporary
folder; our model is loaded from it (dense, and int8 unless --no-int8), then transformers' LlamaForCausalLM is
built from the same tensors (q/k rows permuted to HF's order, SPEC §1.7), one model in memory at a time.
Greedy, a fixed number of new tokens: ours ignores EOS (stop_ids=[]), transformers gets
min_new_tokens = max_new_tokens. Measured:
- decode tokens/s at each batch: batch x (N - 1) / (time of step N - time of step 1) within one run, each step
  time-stamped (transformers through its streamer hook);
- prefill time of a P-token prompt at batch 1: the time to the first new token (and ours again with its first
  P - 1 tokens held in the cache by the call before: prefix reuse);
- the decode's share of the bandwidth limit: weight bytes x decode steps/s / read bandwidth, the read bandwidth
  measured in the run by tools/bench_kernels.py's `read_bandwidth` (every step reads all weights once; the
  embedding table, of which a step reads one row per sequence, is not counted).
Prints a markdown table; int8 rows compare our int8 with transformers in the dense dtype.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable, Sequence

import torch

from .config import ModelArgs, preset

# CodeLlama scaled down (~1.1B parameters), CodeLlama-7B, and a tiny one for tests / smoke runs.
SHAPES: dict[str, ModelArgs] = {
    "small": ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32016, multiple_of=64,
                       rope_theta=1e6),
    "1.1b": ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32016, ffn_hidden=5632,
                      multiple_of=256, rope_theta=1e6),
    "7b": preset("7b"),
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- the checkpoint ----
def write_random_meta(folder: str, args: ModelArgs, dtype: torch.dtype, seed: int = 0, device="cpu") -> str:
    """A Meta folder with random weights: matrices N(0, 0.02^2) as in Llama's init, norms N(1, 0.1^2). Generated
    tensor by tensor in `dtype` on `device` (a GPU draws 7B numbers in seconds), gathered in the one state dict
    that is written and dropped."""
    from .checkpoint import expected_shapes
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for name, shape in expected_shapes(args).items():
        t = torch.randn(shape, generator=g, dtype=torch.float32, device=device)
        sd[name] = (1 + 0.1 * t if len(shape) == 1 else 0.02 * t).to(dtype).cpu()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "params.json"), "w", encoding="utf-8") as f:
        json.dump({**args.to_meta_params(), "vocab_size": args.vocab_size}, f)
    torch.save(sd, os.path.join(folder, "consolidated.00.pth"))
    return folder


def hf_from_meta(folder: str, dtype: torch.dtype, device: str):
    """transformers' LlamaForCausalLM holding the Meta folder's tensors (q/k rows in HF order)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from .checkpoint import _to_layout, meta_to_hf_name, open_checkpoint
    ck = open_checkpoint(folder)
    sd = {meta_to_hf_name(name): _to_layout(ck, name, t, "hf") for name, t in ck.tensors(dtype=dtype)}
    config = LlamaConfig(**ck.args.to_hf_config(), dtype=dtype)
    model = LlamaForCausalLM.from_pretrained(None, config=config, state_dict=sd, dtype=dtype)
    return model.to(device).eval()


# ---- timing ----
class _StepClock:
    """Wall-clock stamps of a generation: the call, then each step's new tokens. transformers' streamer protocol
    (put(prompt ids) at the start, put(new ids) after each step, end()); our engine's steps are stamped the same
    way. Both sides copy each step's ids to the host, which synchronises a GPU, so the stamps are real."""

    def __init__(self):
        self.stamps = [time.perf_counter()]

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def add_random_model_arguments(ap) -> None:
    """The tools' --shape, --dtype and --device flags: the random-weight checkpoint they time (random_model)."""
    ap.add_argument("--shape", default="1.1b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--device", default="cpu")


def random_model(ns, max_batch_size: int, max_seq_len: int, with_hf: bool = False):
    """(our Transformer, its ModelArgs, transformers' LlamaForCausalLM or None) over one random checkpoint of
    ns.shape / ns.dtype / ns.device (add_random_model_arguments), written to a temporary folder and loaded."""
    from .model import load_model
    dtype = getattr(torch, ns.dtype)
    args = SHAPES[ns.shape]
    with tempfile.TemporaryDirectory() as folder:
        write_random_meta(folder, args, dtype, device=ns.device)
        model = load_model(folder, device=ns.device, dtype=dtype, max_batch_size=max_batch_size,
                           max_seq_len=max_seq_len)
        hf = hf_from_meta(folder, dtype, ns.device) if with_hf else None
    return model, args, hf


def _prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 32000, (length - 1,), generator=g).tolist() for _ in range(batch)]


def _ours_runner(model, prefix_cache: bool = False) -> Callable[[list[list[int]], int], list[float]]:
    """The engine behind CodeLlama.generate (which adds only batching across threads): the random checkpoint
    has no tokenizer.model, which CodeLlama.from_pretrained needs. Prefix reuse off by default: the repeats resend their
    prompts, and "prefill P" is the whole prompt's."""
    from .generation import Engine, SamplingParams
    engine = Engine(model, prefix_cache=prefix_cache)

    def run(prompts, n):
        clock = _StepClock()
        for _ in engine.run(prompts, SamplingParams(max_new_tokens=n, temperature=0.0), stop_ids=[]):
            clock.put(None)
        return clock.stamps
    return run


def _hf_runner(model, device: str) -> Callable[[list[list[int]], int], list[float]]:
    def run(prompts, n):
        ids = torch.tensor(prompts, device=device)
        clock = _StepClock()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=0, eos_token_id=2, temperature=None, top_p=None,
                           top_k=None, streamer=clock)
        return clock.stamps[:1] + clock.stamps[2:]  # the first put is the prompt, before any work
    return run


def measure(run, batches: Sequence[int], new_tokens: int, prompt_len: int, prefills: Sequence[int],
            repeats: int) -> dict[str, float]:
    """{"decode b=B": tokens/s, "prefill P": seconds} for one generate function run(prompts, n) -> stamps
    [call, step 1, ..., step n] (step 1 = prefill + first token). Decode: B x (n - 1) / (step n - step 1), the
    steps of one run; prefill: step 1 - call. Median over `repeats` runs, after one short warm-up run per batch
    size (CUDA graph capture, first-call allocations)."""
    for b in batches:
        run(_prompts(b, prompt_len, seed=b), 2)

    def median(fn):
        return statistics.median(fn() for _ in range(repeats))

    out = {}
    for b in batches:
        prompts = _prompts(b, prompt_len, seed=b)

        def decode():
            st = run(prompts, new_tokens)
            assert len(st) == new_tokens + 1, f"expected {new_tokens} steps, got {len(st) - 1}"
            return b * (new_tokens - 1) / (st[-1] - st[1])
        out[f"decode b={b}"] = median(decode)
    for p in prefills:
        prompts = _prompts(1, p, seed=p)

        def prefill():
            st = run(prompts, 1)
            return st[1] - st[0]
        out[f"prefill {p}"] = median(prefill)
    return out


def measure_prefix_held(model, prefills: Sequence[int], repeats: int) -> dict[str, float]:
    """{"prefill P, prefix held": seconds}: the time to the first token of a P-token prompt whose first P - 1
    tokens a cache slot holds from the call before (a resent prompt with its last token edited)."""
    run = _ours_runner(model, prefix_cache=True)
    out = {}
    for p in prefills:
        base = _prompts(1, p, seed=p)[0]
        run([base], 1)
        last = iter(range(3, 32000))

        def held():
            st = run([base[:-1] + [next(last)]], 1)
            return st[1] - st[0]
        out[f"prefill {p}, prefix held"] = statistics.median(held() for _ in range(repeats))
    return out


def weight_bytes(module: torch.nn.Module, skip: Sequence[str] = ("k_cache", "v_cache", "tok_embeddings")) -> int:
    """Bytes of the parameters and buffers one decode step reads in full: all but the KV cache (its short prompt
    is a rounding error here) and the embedding table (a step gathers one row of it per sequence)."""
    tensors = list(module.parameters()) + [b for n, b in module.named_buffers() if n.rsplit(".", 1)[-1] not in skip]
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- the run ----
def read_bandwidth(device: str) -> float:
    """tools/bench_kernels.py's read_bandwidth: one ceiling for all our benchmarks. It lives in the source
    checkout's tools/, so `codellama-ext bench` needs the checkout (an installed wheel has no tools/)."""
    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
    if not os.path.isfile(os.path.join(tools, "bench_kernels.py")):
        raise FileNotFoundError(f"{tools}/bench_kernels.py not found: the generation benchmark runs from a "
                                "source checkout of codellama_ext")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    from bench_kernels import read_bandwidth as measured
    return measured(device)


def _note(what: str) -> None:
    """Progress on stderr (a CPU run at the 1.1B shape takes minutes)."""
    print(f"bench: {what} ({time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)


def _fmt(key: str, v: float) -> str:
    if key.startswith("decode"):
        return f"{v:.1f}"
    return f"{v * 1e3:.0f}" if v >= 0.01 else f"{v * 1e3:.2f}"  # a held prefix can take well under 1 ms


def run_benchmark(shapes: Sequence[str], dtypes: Sequence[str], device: str, batches: Sequence[int],
                  new_tokens: int, prompt_len: int, prefills: Sequence[int], int8: bool = True, hf: bool = True,
                  repeats: int = 1, workdir: str | None = None, out=None) -> list[dict]:
    """Runs every (shape, dtype) and prints the table rows as they come (to `out`, default stdout); returns them
    as dicts."""
    from .model import load_model
    out = out or sys.stdout
    bw = read_bandwidth(device)
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# bench_generate on {device}: {name}, torch {torch.__version__}, {datetime.date.today()}", file=out)
    print(f"# measured read bandwidth: {bw / 1e9:.1f} GB/s; greedy, {new_tokens} new tokens after a "
          f"{prompt_len}-token prompt for decode; prefill = time to the first token at batch 1", file=out)
    print("| model | weights | measure | ours | transformers | speed-up (ours) | ours: share of read bw |",
          file=out)
    print("|---|---|---|---|---|---|---|", file=out, flush=True)
    max_seq = max([prompt_len + new_tokens, *[p + 1 for p in prefills]])
    rows = []
    for shape in shapes:
        for dt_name in dtypes:
            dtype = _DTYPES[dt_name]
            folder = tempfile.mkdtemp(prefix=f"bench-{shape}-", dir=workdir)
            try:
                _note(f"{shape} {dt_name}: writing a random checkpoint")
                write_random_meta(folder, SHAPES[shape], dtype, device=device)
                ours = {}
                for q in ([None, "int8"] if int8 else [None]):
                    _note(f"{shape} {dt_name}{' + int8' if q else ''}: ours")
                    model = load_model(folder, device=device, dtype=dtype, quantize=q, max_seq_len=max_seq,
                                       max_batch_size=max(batches), progress=False)
                    ours[q] = (weight_bytes(model), {**measure(_ours_runner(model), batches, new_tokens, prompt_len,
                                                               prefills, repeats),
                                                     **measure_prefix_held(model, prefills, repeats)})
                    del model
                peer = {}
                if hf:
                    _note(f"{shape} {dt_name}: transformers")
                    model = hf_from_meta(folder, dtype, device)
                    peer = measure(_hf_runner(model, device), batches, new_tokens, prompt_len, prefills, repeats)
                    del model
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            for q, (nbytes, res) in ours.items():
                label = dt_name + (" + int8" if q else "")
                for key, v in res.items():
                    pv = peer.get(key)
                    ratio = "" if pv is None else f"{(v / pv if key.startswith('decode') else pv / v):.2f}x"
                    share = ""
                    if key.startswith("decode"):
                        b = int(key.split("=")[1])
                        share = f"{100 * nbytes * v / b / bw:.0f}% ({nbytes / 1e9:.2f} GB/step)"
                    unit = "tok/s" if key.startswith("decode") else "ms"
                    print(f"| {shape} | {label} | {key} ({unit}) | {_fmt(key, v)} | "
                          f"{'' if pv is None else _fmt(key, pv)} | {ratio} | {share} |", file=out, flush=True)
                    rows.append({"shape": shape, "weights": label, "measure": key, "ours": v, "transformers": pv,
                                 "weight_bytes": nbytes})
    return rows

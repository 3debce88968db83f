"""Peak host memory of loading and converting a checkpoint, against the checkpoint's size.

    python tools/measure_memory.py [--dim 2048 --layers 8 --shards 2 --workdir /tmp/cl-mem]

Writes a random-weight Meta checkpoint (bf16, CodeLlama-shaped: head_dim 128, vocab 32016, theta 1e6, FFN by
Meta's formula), then, each in a fresh process, samples the anonymous resident memory (RssAnon: memory-mapped
file pages are page cache, not counted) every 2 ms while it (a) loads the model into RAM with load_model and
(b) converts it to an HF folder with convert_to_hf, which holds one output shard in memory. Prints peak growth over the process's starting point.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = r"""
import sys, threading, time, torch
def rss_anon():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))
import codellama_ext
peak, done = [0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], rss_anon()); time.sleep(0.002)
before = rss_anon(); t = threading.Thread(target=sample); t.start(); t0 = time.monotonic()
if sys.argv[1] == "load":
    model = codellama_ext.load_model(sys.argv[2], dtype=torch.bfloat16, max_seq_len=16)
    kept = sum(b.numel() * b.element_size() for b in model.buffers())
else:
    codellama_ext.convert_to_hf(sys.argv[2], sys.argv[3], max_shard_bytes=int(sys.argv[4]))
    kept = 0
done[0] = True; t.join(); peak[0] = max(peak[0], rss_anon())
print(peak[0] - before, kept, time.monotonic() - t0)
"""


def write_checkpoint(folder: str, dim: int, layers: int, shards: int) -> int:
    from codellama_ext.config import ffn_hidden_size
    from codellama_ext.checkpoint import META_SPLIT_DIM
    heads, vocab = dim // 128, 32016
    ffn = ffn_hidden_size(dim, 256, None)
    os.makedirs(folder)
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump({"dim": dim, "n_layers": layers, "n_heads": heads, "multiple_of": 256, "norm_eps": 1e-5,
                   "rope_theta": 1e6, "vocab_size": vocab}, f)
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(layers):
        for n, s in {"attention.wq": (dim, dim), "attention.wk": (dim, dim), "attention.wv": (dim, dim),
                     "attention.wo": (dim, dim), "feed_forward.w1": (ffn, dim), "feed_forward.w3": (ffn, dim),
                     "feed_forward.w2": (dim, ffn), "attention_norm": (dim,), "ffn_norm": (dim,)}.items():
            shapes[f"layers.{i}.{n}.weight"] = s
    total = 0
    gen = torch.Generator().manual_seed(0)
    for s in range(shards):
        shard = {}
        for name, shape in shapes.items():
            key = name.rsplit(".", 2)[-2] if name.startswith("layers.") else name.split(".")[0]
            split = META_SPLIT_DIM[key]
            part = list(shape)
            if split is not None:
                part[split] //= shards
            shard[name] = (torch.randn(part, generator=gen) * 0.02).to(torch.bfloat16)
        total += sum(t.numel() * 2 for t in shard.values())
        torch.save(shard, os.path.join(folder, f"consolidated.{s:02d}.pth"))
        del shard
    return total


def probe(*args: str) -> tuple[int, int, float]:
    out = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    growth, kept, secs = out.stdout.split()[-3:]
    return int(growth), int(kept), float(secs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/codellama-ext-memory")
    p.add_argument("--max-shard-mib", type=int, default=2048,
                   help="output shard size of the conversion (it holds one output shard in memory)")
    args = p.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    meta = os.path.join(args.workdir, "meta")
    size = write_checkpoint(meta, args.dim, args.layers, args.shards)
    mib = 2 ** 20
    print(f"checkpoint: dim {args.dim}, {args.layers} layers, {args.shards} shards, bf16, {size / mib:.0f} MiB")
    growth, kept, secs = probe("load", meta)
    print(f"load_model (bf16, CPU): peak anonymous growth {growth / mib:.0f} MiB, of which the model's own "
          f"weights and cache {kept / mib:.0f} MiB -> overhead {(growth - kept) / mib:.0f} MiB ({secs:.1f} s)")
    growth, _, secs = probe("convert", meta, os.path.join(args.workdir, "hf"), str(args.max_shard_mib * mib))
    print(f"convert_to_hf (output shards of {args.max_shard_mib} MiB): peak anonymous growth {growth / mib:.0f} MiB = {100 * growth / size:.0f}% of the "
          f"checkpoint ({secs:.1f} s)")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

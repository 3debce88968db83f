"""Where a decode step's GPU time goes: one random-weight model, decode steps run eagerly under torch.profiler,
kernel time per name and per step, against the step's weight bytes at the measured read bandwidth.

    PYTHONPATH=. python tools/profile_decode.py --shape 7b --dtype float16 [--quantize int8] [--batch 1] [--pos 80]
"""

from __future__ import annotations

import argparse

import torch

from codellama_ext.benchmark import SHAPES, read_bandwidth, weight_bytes
from codellama_ext.model import Transformer


def random_fill(model: Transformer) -> None:
    g = torch.Generator(device=model.device).manual_seed(0)
    for name, t in model.named_buffers():
        if name.endswith(("k_cache", "v_cache")):
            t.zero_()
        elif t.dtype == torch.int8:
            t.copy_(torch.randint(-127, 128, t.shape, generator=g, device=t.device, dtype=torch.int8))
        elif name.endswith("scales"):
            t.fill_(0.02 / 127)
        elif t.dim() == 1:
            t.fill_(1.0)
        else:
            t.normal_(0, 0.02, generator=g)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pos", type=int, default=80)
    ap.add_argument("--steps", type=int, default=10)
    ns = ap.parse_args()
    dev = "cuda"
    model = Transformer(SHAPES[ns.shape], dtype=getattr(torch, ns.dtype), device=dev, max_seq_len=ns.pos + 64,
                        max_batch_size=ns.batch, quantize=ns.quantize)
    random_fill(model)
    B = ns.batch
    tokens = torch.full((B,), 5, dtype=torch.long, device=dev)
    pos = torch.full((B,), ns.pos, dtype=torch.int32, device=dev)
    slots = torch.arange(B, dtype=torch.int32, device=dev)
    for _ in range(3):
        model.decode_step(tokens, pos, slots)
    torch.cuda.synchronize()
    # graphed step time, as the engine runs it
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model.decode_step(tokens, pos, slots)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ev0.record()
    for _ in range(20):
        graph.replay()
    ev1.record()
    torch.cuda.synchronize()
    step_ms = ev0.elapsed_time(ev1) / 20
    nbytes = weight_bytes(model)
    bw = read_bandwidth(dev)
    print(f"# {ns.shape} {ns.dtype} quantize={ns.quantize} batch={B} pos={ns.pos}: graphed step {step_ms:.3f} ms, "
          f"weights {nbytes / 1e9:.2f} GB -> {100 * nbytes / (step_ms * 1e-3) / bw:.0f}% of {bw / 1e9:.0f} GB/s; "
          f"at full bandwidth {nbytes / bw * 1e3:.3f} ms")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ns.steps):
            model.decode_step(tokens, pos, slots)
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            r = rows.setdefault(e.name, [0, 0.0])
            r[0] += 1
            r[1] += e.time_range.elapsed_us()
    total = sum(v[1] for v in rows.values()) / ns.steps
    print(f"# kernel time per eager step {total / 1e3:.3f} ms (sum of kernels; the graphed step adds the gaps)")
    print("| kernel | calls/step | us/step | us/call | share |")
    print("|---|---|---|---|---|")
    for name, (n, us) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name[:90]} | {n / ns.steps:.0f} | {us / ns.steps:.1f} | {us / n:.2f} | {100 * us / ns.steps / total:.1f}% |")


if __name__ == "__main__":
    main()

"""Where a decode step's time goes: one random-weight model, decode steps under torch.profiler, time per kernel
(CUDA) or per op (CPU) and per step, against the step's weight bytes at the measured read bandwidth.

    PYTHONPATH=. python tools/profile_decode.py --shape 7b --dtype float16 [--quantize int8] [--batch 1] [--pos 80]
    PYTHONPATH=. python tools/profile_decode.py --device cpu --shape 1.1b --dtype bfloat16

On CUDA the step is timed as the engine runs it (captured in a CUDA graph and replayed) and profiled eagerly
(kernel times; the graphed step adds only the gaps between them). On the CPU both are eager and the table splits
the step by operator (self time).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from codellama_ext.benchmark import SHAPES, read_bandwidth, weight_bytes
from codellama_ext.model import Transformer


def random_fill(model: Transformer) -> None:
    """Weights of a random model (N(0, 0.02^2) matrices, unit norms, int8 weights with scales of the same spread);
    the profile depends on shapes, not values."""
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


def step_ms(model: Transformer, step, repeats: int) -> float:
    """Milliseconds per decode step: a CUDA graph's replays timed by events, or eager steps by the wall clock."""
    if model.device.type != "cuda":
        step()
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        return (time.perf_counter() - t0) / repeats * 1e3
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--quantize", default=None, choices=("int8",))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pos", type=int, default=80, help="cached positions before the step")
    ap.add_argument("--steps", type=int, default=10, help="steps profiled (CUDA: also 2x that many timed)")
    ns = ap.parse_args()
    model = Transformer(SHAPES[ns.shape], dtype=getattr(torch, ns.dtype), device=ns.device,
                        max_seq_len=ns.pos + 64, max_batch_size=ns.batch, quantize=ns.quantize)
    random_fill(model)
    dev, B = model.device, ns.batch
    tokens = torch.full((B,), 5, dtype=torch.long, device=dev)
    pos = torch.full((B,), ns.pos, dtype=torch.int32, device=dev)
    slots = torch.arange(B, dtype=torch.int32, device=dev)

    def step():
        return model.decode_step(tokens, pos, slots)
    for _ in range(3):
        step()
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    ms = step_ms(model, step, 2 * ns.steps if cuda else ns.steps)
    nbytes, bw = weight_bytes(model), read_bandwidth(str(dev))
    print(f"# {ns.shape} {ns.dtype} quantize={ns.quantize} batch={B} pos={ns.pos} on {dev}: "
          f"{'graphed' if cuda else 'eager'} step {ms:.3f} ms, weights {nbytes / 1e9:.2f} GB -> "
          f"{100 * nbytes / (ms * 1e-3) / bw:.0f}% of {bw / 1e9:.0f} GB/s; "
          f"at full bandwidth {nbytes / bw * 1e3:.3f} ms")
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(ns.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    rows: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == kind:
            r = rows.setdefault(e.name, [0, 0.0])
            r[0] += 1
            r[1] += e.time_range.elapsed_us() if cuda else e.self_cpu_time_total
    total = sum(v[1] for v in rows.values()) / ns.steps
    print(f"# {'kernel' if cuda else 'op self'} time per eager step {total / 1e3:.3f} ms")
    print(f"| {'kernel' if cuda else 'op'} | calls/step | us/step | us/call | share |")
    print("|---|---|---|---|---|")
    for name, (n, us) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name[:90]} | {n / ns.steps:.0f} | {us / ns.steps:.1f} | {us / n:.2f} | "
              f"{100 * us / ns.steps / total:.1f}% |")


if __name__ == "__main__":
    main()

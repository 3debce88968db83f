"""Pure-torch definitions of every kernel: the oracle of the kernel tests.

Each function states its precision order; the kernels follow it (csrc/include/codellama/*.h cite it).
Written for clarity, not speed. Shapes use the names of python/bindings.cpp.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Meta / HF order: upcast to fp32, x * rsqrt(mean(x^2) + eps), round to x's dtype, times weight."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed * weight


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream's sum is rounded to the activation dtype (as in the eager model) before the norm."""
    new_residual = x + residual
    return rms_norm(new_residual, weight, eps), new_residual


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x W^T: fp32 accumulation, one rounding to x's dtype at the end (float64 inputs stay float64).
    x [..., K], weight [N, K] -> [..., N]."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(acc) @ weight.to(acc).T).to(x.dtype)


def quantize_int8(weight: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: per row (group_size 0) or per group of group_size columns, in fp32,
    scale = max|w| / 127 (1 for an all-zero group), q = clamp(round_half_even(w / scale), -127, 127).
    weight [N, K] -> (int8 [N, K], float32 [N, G]) with G = 1 or K / group_size."""
    n, k = weight.shape
    gs = k if group_size == 0 else group_size
    wg = weight.float().reshape(n, k // gs, gs)
    amax = wg.abs().amax(-1)
    # a true division (dividing by a Python scalar may multiply by its reciprocal on CUDA: 1 ulp off)
    scales = torch.where(amax > 0, amax / torch.full_like(amax, 127.0), torch.ones_like(amax))
    q = torch.round(wg / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(n, k), scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w[n, k] = q[n, k] * scales[n, k // (K / G)], the product in fp32 (fp64 for dtype float64), then rounded to dtype."""
    n, k = qweight.shape
    g = scales.shape[1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = qweight.to(acc).reshape(n, g, k // g) * scales.to(acc)[..., None]
    return w.reshape(n, k).to(dtype)


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Plain torch's weight-only int8 linear: dequantise to x's dtype, then linear() (fp32 accumulation, one
    rounding). With float64 x this is the exact y = sum_g scale[n, g] * sum_{k in g} x[m, k] q[n, k]."""
    return linear(x, dequantize_int8(qweight, scales, x.dtype))


def kv_cache_append(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slots: torch.Tensor, positions: torch.Tensor) -> None:
    """In place: k_cache[slots[t], positions[t]] = k[t] and v_cache likewise (a pure copy, bitwise)."""
    k_cache[slots.long(), positions.long()] = k
    v_cache[slots.long(), positions.long()] = v


def _causal_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, first_pos: int) -> torch.Tensor:
    """q [L, Hq, D] at positions first_pos + i over keys k, v [N, Hkv, D] at positions 0..N-1 (causal, inclusive).

    HF eager order: kv heads repeated (head h reads kv head h // (Hq // Hkv)), scores in fp32 (fp64 stays fp64),
    mask, softmax in fp32, P cast to q's dtype, P @ v in q's dtype (one rounding)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, N, D]
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = (q.transpose(0, 1).to(acc) @ k.to(acc).transpose(1, 2)) * scale  # [Hq, L, N]
    qpos = first_pos + torch.arange(q.shape[0], device=q.device)[:, None]
    kpos = torch.arange(k.shape[1], device=q.device)[None, :]
    scores = scores.masked_fill(kpos > qpos, float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=acc).to(q.dtype)
    return (p @ v).transpose(0, 1)  # [L, Hq, D]


def attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens: torch.Tensor,
                      start_pos: torch.Tensor, slots: torch.Tensor, max_query_len: int | None = None,
                      scale: float | None = None) -> torch.Tensor:
    """Per sequence b: tokens cu_seqlens[b]..cu_seqlens[b+1]-1 at positions start_pos[b] + i attend
    cache[slots[b], 0..position] (see _causal_gqa for the precision order). q [T, Hq, D] -> [T, Hq, D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    cu, sp, sl = cu_seqlens.tolist(), start_pos.tolist(), slots.tolist()
    for b in range(len(cu) - 1):
        n = sp[b] + cu[b + 1] - cu[b]
        out[cu[b]:cu[b + 1]] = _causal_gqa(q[cu[b]:cu[b + 1]], k_cache[sl[b], :n], v_cache[sl[b], :n], scale, sp[b])
    return out


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """One query per sequence (the last position) over cache[slots[b], :seq_lens[b]]. q [B, Hq, D] -> [B, Hq, D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    for b, (slot, n) in enumerate(zip(slots.tolist(), seq_lens.tolist())):
        out[b:b + 1] = _causal_gqa(q[b:b + 1], k_cache[slot, :n], v_cache[slot, :n], scale, n - 1)
    return out


# ---- rotary embedding, SwiGLU gate, argmax / sampling (csrc/include/codellama/{rotary,activation,sampling}.h) ----

def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Meta's precompute_freqs_cis: 1 / theta^(2i/D) in float32, i = 0 .. D/2 - 1.

    Computed on the CPU and then moved, as Meta does (freqs_cis is built at model construction, on the host):
    CUDA's float pow can differ by an ulp, and at positions near 16k an ulp of the frequency moves the angle
    by ~1e-3 rad."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    return inv.to(device)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float,
                     interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """New rotated (q, k); q [T, Hq, D], k [T, Hkv, D], positions [T].

    Angles pos * inv_freq in float32 always (as Meta and HF); cos/sin and the rotation in float32 for
    fp32/fp16/bf16 inputs (float64 inputs rotate in float64: the test's truth), one rounding to the input
    dtype (Meta's order, SPEC.md §2). interleaved: Meta's complex multiply of pairs (2i, 2i+1) via
    torch.polar; otherwise HF's x * cos + rotate_half(x) * sin with pairs (i, i + D/2)."""
    d = q.shape[-1]
    angles = torch.outer(positions.float(), rope_inv_freq(d, theta, q.device))  # [T, D/2] fp32
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    angles = angles.to(cdt)

    def meta(x):
        freqs_cis = torch.polar(torch.ones_like(angles), angles)  # [T, D/2] complex
        xc = torch.view_as_complex(x.to(cdt).reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(2).to(x.dtype)

    def hf(x):
        emb = torch.cat((angles, angles), dim=-1)[:, None, :]
        xf = x.to(cdt)
        rotated = torch.cat((-xf[..., d // 2:], xf[..., : d // 2]), dim=-1)
        return (xf * emb.cos() + rotated * emb.sin()).to(x.dtype)

    f = meta if interleaved else hf
    return f(q), f(k)


def hf_permute_heads(x: torch.Tensor) -> torch.Tensor:
    """SPEC.md §1.7 per head: new row j*(D/2) + i <- old 2i + j, on the last dim of x [..., D]."""
    d = x.shape[-1]
    return x.reshape(*x.shape[:-1], d // 2, 2).transpose(-1, -2).reshape(x.shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """torch eager `F.silu(gate) * up`: silu in fp32 rounded to x's dtype, then the product rounded again."""
    f = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :f]) * x[..., f:]


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """The Llama MLP's gate: silu_and_mul of the projection on [gate rows; up rows] (int8 with scales)."""
    return silu_and_mul(linear(x, weight) if scales is None else linear_int8(x, weight, scales))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax over the last dim: the first maximum; NaN counts as the largest value."""
    return torch.argmax(logits, dim=-1)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           uniform: torch.Tensor) -> torch.Tensor:
    """Per-row sampling at explicit uniforms (the rules of csrc/include/codellama/sampling.h).

    temperature <= 0: argmax. Else x = logits.float() / T, e = exp(x - max x) (softmax numerators, fp32);
    sorted order: x descending, equal x by ascending index (a stable descending sort); keep the first k
    (1 <= k < V; else all); Meta's top-p on the kept, renormalised: drop entries whose mass before them
    exceeds top_p * Z (double cumulative sums; the first entry is always kept; top_p >= 1: none dropped);
    then the first kept entry whose cumulative mass exceeds uniform * (kept mass), else the last kept."""
    out = []
    for b in range(logits.shape[0]):
        row = logits[b].float()
        t = temperature[b].item()
        if not t > 0:
            out.append(int(torch.argmax(row)))
            continue
        x = row / temperature[b].float()
        x = torch.where(x == 0, torch.zeros_like(x), x)  # -0 and +0 are equal: order by index
        e = torch.exp(x - x.max())
        order = torch.sort(x, descending=True, stable=True).indices
        v = row.shape[0]
        k = int(top_k[b])
        kp = k if 1 <= k < v else v
        idx = order[:kp]
        es = e[idx].double()
        z = es.sum()
        p = top_p[b].item()
        if p < 1:
            cum = es.cumsum(0)
            before = torch.cat([cum.new_zeros(1), cum[:-1]])
            keep = before <= p * z
            keep[0] = True
            n = int(keep.sum())
            mass = cum[n - 1] if n < kp else cum[-1]
        else:
            n, mass = kp, z
        cdf = es[:n].cumsum(0)
        target = torch.tensor([float(uniform[b]) * float(mass)], dtype=torch.float64, device=cdf.device)
        j = min(int(torch.searchsorted(cdf, target, right=True)), n - 1)
        out.append(int(idx[j]))
    return torch.tensor(out, dtype=torch.int64, device=logits.device)


# ---- the decoder layers (python/ops/decoder.cpp) ----

def decoder_layers(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor], k_cache: torch.Tensor,
                   v_cache: torch.Tensor, positions: torch.Tensor, token_slots: torch.Tensor, slots: torch.Tensor, *,
                   seq_lens: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                   start_pos: torch.Tensor | None = None, max_query_len: int = 0, eps: float = 1e-5,
                   theta: float = 1e6, interleaved: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm decoder layers, each the reference ops above in the model's order (SPEC.md §1.4), appending
    to the caches [L, Bc, S, Hkv, D] in place. weights: 6 per layer (attention_norm, wqkv, wo, ffn_norm, w13,
    w2); scales: none or the int8 scales of wqkv, wo, w13, w2 per layer. x [T, dim] -> (the last layer's output,
    the residual stream before it)."""
    T, D, hkv = x.shape[0], k_cache.shape[-1], k_cache.shape[-2]
    hq = weights[1].shape[0] // D - 2 * hkv
    hidden, residual = x, None
    for i in range(k_cache.shape[0]):
        norm1, wqkv, wo, norm2, w13, w2 = weights[6 * i:6 * i + 6]
        layer_scales = scales[4 * i:4 * i + 4]

        def project(h, j, w):
            return linear_int8(h, w, layer_scales[j]) if scales else linear(h, w)

        if residual is None:
            h, residual = rms_norm(hidden, norm1, eps), hidden
        else:
            h, residual = fused_add_rms_norm(hidden, residual, norm1, eps)
        q, k, v = project(h, 0, wqkv).view(T, hq + 2 * hkv, D).split([hq, hkv, hkv], dim=1)
        q, k = rotary_embedding(q, k, positions, theta, interleaved)
        kv_cache_append(k, v, k_cache[i], v_cache[i], token_slots, positions)
        if seq_lens is not None:
            attn = attention_decode(q, k_cache[i], v_cache[i], slots, seq_lens)
        else:
            attn = attention_prefill(q, k_cache[i], v_cache[i], cu_seqlens, start_pos, slots, max_query_len)
        h, residual = fused_add_rms_norm(project(attn.reshape(T, hq * D), 1, wo), residual, norm2, eps)
        hidden = project(silu_and_mul(project(h, 2, w13)), 3, w2)
    return hidden, residual

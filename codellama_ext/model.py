"""The CodeLlama transformer on our kernels (codellama_ext.ops), and `load_model`.

Architecture: SPEC.md §1.4 (Meta) / §5 (HF): pre-norm decoder, RMSNorm in fp32 rounded to the activation dtype,
rotary in fp32 (interleaved pairs for Meta-layout q/k rows, rotate-half for HF rows, same scores), GQA attention
with softmax in fp32 over a preallocated KV cache [max_batch, max_seq_len, Hkv, D] per layer, SwiGLU FFN,
untied output matrix, float32 logits. At load q/k/v are fused into one [(Hq + 2Hkv) D, dim] weight and gate/up
into one [2F, dim] weight, so a decode step does one GEMV for each.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .checkpoint import Checkpoint, CheckpointError, open_checkpoint, verify_checklist
from .config import ModelArgs

__all__ = ["Linear", "Transformer", "load_model", "default_dtype", "resolve_dtype", "estimate_memory"]


class Linear(nn.Module):
    """y = x W^T through ops.linear, or through ops.linear_int8 when quantized (per-row symmetric int8)."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, device, quantize: str | None = None,
                 group_size: int = 0):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.quantized = quantize == "int8"
        self.group_size = group_size
        if self.quantized:
            groups = 1 if group_size == 0 else in_features // group_size
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        else:
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=dtype, device=device))

    def load_rows(self, row0: int, w: torch.Tensor) -> None:
        """Writes w [n, in_features] into rows row0 .. row0 + n (quantizing it when int8: rows are independent)."""
        rows = slice(row0, row0 + w.shape[0])
        if self.quantized:
            q, s = ops.quantize_int8(w.contiguous(), self.group_size)
            self.qweight[rows].copy_(q)
            self.scales[rows].copy_(s)
        else:
            self.weight[rows].copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            return ops.linear_int8(x, self.qweight, self.scales)
        return ops.linear(x, self.weight)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, dtype, device, quantize):
        super().__init__()
        D = args.dim
        self.wqkv = Linear(args.qkv_rows, D, dtype, device, quantize)
        self.wo = Linear(D, args.n_heads * args.head_dim, dtype, device, quantize)
        self.w13 = Linear(2 * args.ffn_hidden, D, dtype, device, quantize)
        self.w2 = Linear(D, args.ffn_hidden, dtype, device, quantize)
        self.register_buffer("attention_norm", torch.empty(D, dtype=dtype, device=device))
        self.register_buffer("ffn_norm", torch.empty(D, dtype=dtype, device=device))


class Transformer(nn.Module):
    """CodeLlama decoder with a preallocated KV cache.

    `interleaved` is the rotary layout of the q/k weight rows: True for Meta checkpoints, False for HF ones.
    Weights are allocated empty; `load_weights` fills them from (Meta name, tensor) pairs.
    """

    def __init__(self, args: ModelArgs, *, dtype: torch.dtype = torch.float32, device="cpu",
                 interleaved: bool = True, max_seq_len: int = 2048, max_batch_size: int = 1,
                 quantize: str | None = None):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("Transformer: args.vocab_size is unknown (-1); take it from the tokenizer or embedding")
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        if max_seq_len <= 0 or max_batch_size <= 0:
            raise ValueError(f"max_seq_len ({max_seq_len}) and max_batch_size ({max_batch_size}) must be positive")
        device = torch.device(device)
        self.args, self.dtype, self.interleaved, self.quantize = args, dtype, interleaved, quantize
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        self.register_buffer("tok_embeddings", torch.empty(args.vocab_size, args.dim, dtype=dtype, device=device))
        self.layers = nn.ModuleList(Block(args, dtype, device, quantize) for _ in range(args.n_layers))
        self.register_buffer("norm", torch.empty(args.dim, dtype=dtype, device=device))
        self.output = Linear(args.vocab_size, args.dim, dtype, device, quantize)
        # Empty, not zeros: every position is written before it is read (the attention tests poison unwritten rows
        # with NaN), and on the CPU the untouched pages of a fresh allocation take no memory, so a cache sized for
        # 8 x 4096 positions (16 GiB for 7B) costs RAM only as positions fill.
        cache_shape = (args.n_layers, max_batch_size, max_seq_len, args.n_kv_heads, args.head_dim)
        self.register_buffer("k_cache", torch.empty(cache_shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.empty(cache_shape, dtype=dtype, device=device), persistent=False)
        self._layer_lists = None
        # Counts the calls that change the KV cache: the engine's record of which ids each slot holds
        # (generation.Engine, prefix reuse) stays valid only while it made every such call itself.
        self.cache_writes = 0

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.device

    # ---- loading ----
    def load_weight(self, name: str, t: torch.Tensor) -> None:
        """Copies one consolidated Meta-named tensor into place (into its slice of a fused weight)."""
        a = self.args
        t = t.to(device=self.device, dtype=self.dtype)
        if name == "tok_embeddings.weight":
            self.tok_embeddings.copy_(t)
        elif name == "norm.weight":
            self.norm.copy_(t)
        elif name == "output.weight":
            self.output.load_rows(0, t)
        else:
            _, i, rest = name.split(".", 2)
            blk = self.layers[int(i)]
            hq, hkv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
            if rest == "attention.wq.weight":
                blk.wqkv.load_rows(0, t)
            elif rest == "attention.wk.weight":
                blk.wqkv.load_rows(hq, t)
            elif rest == "attention.wv.weight":
                blk.wqkv.load_rows(hq + hkv, t)
            elif rest == "attention.wo.weight":
                blk.wo.load_rows(0, t)
            elif rest == "feed_forward.w1.weight":
                blk.w13.load_rows(0, t)
            elif rest == "feed_forward.w3.weight":
                blk.w13.load_rows(a.ffn_hidden, t)
            elif rest == "feed_forward.w2.weight":
                blk.w2.load_rows(0, t)
            elif rest == "attention_norm.weight":
                blk.attention_norm.copy_(t)
            elif rest == "ffn_norm.weight":
                blk.ffn_norm.copy_(t)
            else:
                raise KeyError(f"unknown weight name {name!r}")

    # ---- forward ----
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor | Sequence[int] = 0, *,
                cu_seqlens: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Float32 logits for every position, appending keys/values to the KV cache.

        Rectangular batch: tokens [B, T] (B <= max_batch_size), sequence b in cache slot b at positions
        start_pos[b] + t (start_pos an int or [B]) -> logits [B, T, V].
        Packed: tokens [N] with cu_seqlens [B+1] (sequence b = tokens cu_seqlens[b] .. cu_seqlens[b+1]-1),
        start_pos [B], slots [B] (cache slot of each sequence, default 0..B-1) -> logits [N, V].
        Positions before start_pos must already be in the cache (earlier calls).
        last_only: logits of each sequence's last token only ([B, V] in both layouts), so a long prefill does
        not materialise [N, V] float32 logits."""
        self.cache_writes += 1
        return self._forward(tokens, start_pos, cu_seqlens, slots, self.k_cache, self.v_cache, last_only)

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One new token per sequence, with no checks and no host synchronisation, so it can be captured in a
        CUDA graph: tokens [B] int64, positions [B] int32, slots [B] int32, all on the model's device (the
        caller guarantees ids < vocab, positions < max_seq_len, distinct slots < max_batch_size) -> [B, V]."""
        self.cache_writes += 1
        return self._layers(tokens, positions, slots, slots, self.k_cache, self.v_cache, seq_lens=positions + 1)

    @torch.inference_mode()
    def logits(self, token_ids) -> torch.Tensor:
        """Side-effect-free full forward from position 0 (a scratch KV cache; the model's cache is untouched).
        token_ids [T] -> [T, V] or [B, T] -> [B, T, V], float32."""
        tokens = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        squeeze = tokens.dim() == 1
        if squeeze:
            tokens = tokens[None]
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"logits: token_ids must be [T] or [B, T] with T >= 1, got shape {list(tokens.shape)}")
        a = self.args
        shape = (a.n_layers, tokens.shape[0], tokens.shape[1], a.n_kv_heads, a.head_dim)
        kc = torch.empty(shape, dtype=self.dtype, device=self.device)
        vc = torch.empty(shape, dtype=self.dtype, device=self.device)
        out = self._forward(tokens, 0, None, None, kc, vc)
        return out[0] if squeeze else out

    def _forward(self, tokens, start_pos, cu_seqlens, slots, k_cache, v_cache, last_only=False) -> torch.Tensor:
        a, dev = self.args, self.device
        tokens = torch.as_tensor(tokens, device=dev)
        if tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"forward: tokens must be an integer tensor, got {tokens.dtype}")
        cache_b, cache_s = k_cache.shape[1], k_cache.shape[2]
        packed = cu_seqlens is not None
        if packed:
            if tokens.dim() != 1:
                raise ValueError(f"forward: packed tokens must be 1-D [N], got shape {list(tokens.shape)}")
            cu = torch.as_tensor(cu_seqlens, dtype=torch.int64).cpu()
            B = cu.numel() - 1
            lens = (cu[1:] - cu[:-1])
            if B < 1 or cu[0] != 0 or cu[-1] != tokens.numel() or (lens < 1).any():
                raise ValueError(f"forward: cu_seqlens must rise strictly from 0 to {tokens.numel()}, "
                                 f"got {cu.tolist()}")
            flat = tokens.long()
        else:
            if tokens.dim() != 2 or tokens.shape[1] == 0:
                raise ValueError(f"forward: tokens must be [B, T] with T >= 1 (or 1-D with cu_seqlens), "
                                 f"got shape {list(tokens.shape)}")
            B, T = tokens.shape
            lens = torch.full((B,), T, dtype=torch.int64)
            cu = torch.arange(B + 1, dtype=torch.int64) * T
            flat = tokens.reshape(-1).long()
        sp = torch.as_tensor(start_pos, dtype=torch.int64).cpu().reshape(-1)
        if sp.numel() == 1:
            sp = sp.expand(B).clone()
        if sp.numel() != B:
            raise ValueError(f"forward: start_pos must be an int or have one entry per sequence ({B}), "
                             f"got {sp.numel()}")
        sl = torch.arange(B, dtype=torch.int64) if slots is None else torch.as_tensor(slots, dtype=torch.int64).cpu()
        if sl.numel() != B or (sl < 0).any() or (sl >= cache_b).any() or sl.unique().numel() != B:
            raise ValueError(f"forward: {B} sequence(s) need distinct cache slots in [0, {cache_b}), got {sl.tolist()}"
                             f" (max_batch_size {cache_b})")
        ends = sp + lens
        if (sp < 0).any() or (ends > cache_s).any():
            raise ValueError(f"forward: positions up to {int(ends.max())} exceed max_seq_len {cache_s} "
                             f"(start_pos {sp.tolist()}, lengths {lens.tolist()})")
        if (flat < 0).any() or (flat >= a.vocab_size).any():
            raise ValueError(f"forward: token ids must lie in [0, {a.vocab_size})")
        N = flat.numel()
        # per-token cache coordinates
        seq_of_tok = torch.repeat_interleave(torch.arange(B), lens)
        pos = (sp[seq_of_tok] + torch.arange(N) - cu[:-1][seq_of_tok]).to(torch.int32).to(dev)
        tok_slots = sl[seq_of_tok].to(torch.int32).to(dev)
        sl32 = sl.to(torch.int32).to(dev)
        rows = (cu[1:] - 1).to(dev) if last_only else None
        if bool((lens == 1).all()):
            attention = dict(seq_lens=(sp + 1).to(torch.int32).to(dev))
        else:
            attention = dict(cu_seqlens=cu.to(torch.int32).to(dev), start_pos=sp.to(torch.int32).to(dev),
                             max_query_len=int(lens.max()))
        logits = self._layers(flat, pos, tok_slots, sl32, k_cache, v_cache, rows, **attention)
        return logits if packed or last_only else logits.view(B, -1, a.vocab_size)

    def _layers(self, flat, pos, tok_slots, slots, k_cache, v_cache, rows=None, **attention) -> torch.Tensor:
        """The decoder over N tokens at cache coordinates (tok_slots, pos) -> float32 logits [N, V] (or of the
        tokens `rows` only); `attention` holds ops.decoder_layers' decode (seq_lens) or prefill arguments."""
        a = self.args
        weights, scales = self._layer_tensors()
        x, residual = ops.decoder_layers(F.embedding(flat, self.tok_embeddings), weights, scales, k_cache, v_cache,
                                         pos, tok_slots, slots, eps=a.norm_eps, theta=a.rope_theta,
                                         interleaved=self.interleaved, **attention)
        if rows is not None:
            x, residual = x[rows], residual[rows]
        h, _ = ops.fused_add_rms_norm(x, residual, self.norm, a.norm_eps)
        return self.output(h).float()

    def _layer_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """ops.decoder_layers' weight lists, built once: loading copies into these tensors in place, and moving
        the model (nn.Module._apply: .to(), .cuda(), ...) replaces them, so _apply drops the lists."""
        if self._layer_lists is None:
            weights, scales = [], []
            for blk in self.layers:
                linears = (blk.wqkv, blk.wo, blk.w13, blk.w2)
                mats = [lin.qweight if lin.quantized else lin.weight for lin in linears]
                weights += [blk.attention_norm, mats[0], mats[1], blk.ffn_norm, mats[2], mats[3]]
                scales += [lin.scales for lin in linears if lin.quantized]
            self._layer_lists = (weights, scales)
        return self._layer_lists

    def _apply(self, fn, *args, **kwargs):
        self._layer_lists = None
        self.cache_writes += 1  # a cache converted to another dtype no longer holds what the new dtype computes
        return super()._apply(fn, *args, **kwargs)

    def copy_cache(self, src: int, dst: int, n: int) -> None:
        """Copies the keys and values of positions [0, n) of cache slot src into slot dst."""
        self.cache_writes += 1
        self.k_cache[:, dst, :n].copy_(self.k_cache[:, src, :n])
        self.v_cache[:, dst, :n].copy_(self.v_cache[:, src, :n])

    def reset_cache(self) -> None:
        """Zeroes the KV cache (not needed for correctness: positions are always written before they are read)."""
        self.cache_writes += 1
        self.k_cache.zero_()
        self.v_cache.zero_()


# ---- dtype policy (issue 4) ----
def _cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: torch.device | str) -> torch.dtype:
    """float16 on CUDA; on CPU bfloat16 where the CPU computes it natively (AVX512-BF16 / AMX), else float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype, device, storage_dtype: torch.dtype) -> torch.dtype:
    """None: the device default; "auto": the checkpoint's storage dtype (float64 stored -> float32); a torch dtype
    or its name: honoured."""
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, str):
        if dtype == "auto":
            return torch.float32 if storage_dtype == torch.float64 else storage_dtype
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be 'auto', None, or one of {sorted(_DTYPE_NAMES)}, got {dtype!r}")
        return _DTYPE_NAMES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype=None,
               quantize: str | None = None, max_seq_len: int = 2048, max_batch_size: int = 1,
               progress: bool | None = None, verify_checksums: bool = False) -> Transformer:
    """Loads a Meta folder (params.json + consolidated.NN.pth) or an HF folder (config.json + safetensors / .bin).

    Files are memory-mapped and streamed one tensor at a time, converted to `dtype` and copied into the model's
    preallocated (fused) weights on `device`, so host memory grows by about one tensor, not the model.
    dtype: None = float16 on CUDA, bfloat16/float32 on CPU (see default_dtype); "auto" = as stored; or explicit.
    quantize="int8": per-row int8 linear weights (embedding and norms stay in `dtype`).
    progress: a progress line on stderr; None = only when stderr is a terminal and the checkpoint is over 1 GB.
    verify_checksums: first check the files against the folder's checklist.chk (Meta's md5 list; see
    checkpoint.verify_checklist), so a corrupt download or a shard of another checkpoint is an error; a folder
    without one (any HF folder) is an error too."""
    if verify_checksums:
        verify_checklist(path, progress=progress)  # before open_checkpoint reads any pickle
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ckpt: Checkpoint = open_checkpoint(path)
    dt = resolve_dtype(dtype, device, ckpt.storage_dtype)
    model = Transformer(ckpt.args, dtype=dt, device=device, interleaved=ckpt.layout == "meta",
                        max_seq_len=max_seq_len, max_batch_size=max_batch_size, quantize=quantize)
    if progress is None:
        progress = sys.stderr.isatty() and ckpt.nbytes() > (1 << 30)
    total, t0 = len(ckpt), time.monotonic()
    for n, (name, t) in enumerate(ckpt.tensors(dtype=dt, device=device), 1):
        try:
            model.load_weight(name, t)
        except ValueError as e:  # a weight the int8 quantizer refuses (NaN / inf): say which
            raise CheckpointError(f"{os.fspath(path)}: tensor {name!r}: {e}") from None
        del t
        if progress:
            print(f"\rloading {os.path.basename(os.fspath(path))}: {n}/{total} tensors, "
                  f"{time.monotonic() - t0:.0f} s", end="" if n < total else "\n", file=sys.stderr, flush=True)
    model.eval()
    return model


def estimate_memory(args: ModelArgs, dtype: torch.dtype = torch.float16, context: int = 2048, batch: int = 1,
                    quantize: str | None = None, prefill_chunk: int | None = None) -> dict[str, int]:
    """Bytes this engine allocates for a model: weights (as load_model stores them: fused, int8 + float32 row
    scales when quantized), the KV cache (batch x context; full, as on a GPU: on the CPU its pages are committed
    as positions fill), and working memory of one forward over
    prefill_chunk tokens (default: the whole context) - the largest live activations plus float32 logits."""
    elt = torch.empty((), dtype=dtype).element_size()
    D, F, V, L = args.dim, args.ffn_hidden, args.vocab_size, args.n_layers
    linears = [(args.qkv_rows, D), (D, args.n_heads * args.head_dim), (2 * F, D), (D, F)] * L + [(V, D)]
    if quantize == "int8":
        lin = sum(n * k + n * 4 for n, k in linears)
    elif quantize is None:
        lin = sum(n * k for n, k in linears) * elt
    else:
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    weights = lin + (V * D + (2 * L + 1) * D) * elt
    kv = 2 * L * batch * context * args.n_kv_heads * args.head_dim * elt
    t = batch * (prefill_chunk or context)
    # residual, normed x, qkv, attention out, 2F gate/up + F activation, logits in dtype + fp32
    work = t * (3 * D + args.qkv_rows + D + 3 * F) * elt + t * V * (elt + 4)
    return {"weights": weights, "kv_cache": kv, "working": work, "total": weights + kv + work}

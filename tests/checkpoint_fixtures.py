"""Test helpers: small random transformers LlamaForCausalLM models, saved as HF folders (safetensors, with or
without an index, or pytorch_model.bin) and as Meta folders with 1, 2 or 4 shards written exactly as SPEC.md §1.6
describes (q/k rows taken back to Meta's interleaved order with the inverse permutation of §1.7)."""

from __future__ import annotations

import json
import os

import torch

from codellama_ext.checkpoint import META_SPLIT_DIM, hf_to_meta_name, permute_for_meta


def tiny_hf_config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab=32016, ffn=192, theta=1e6, init=0.08):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=dim, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                       num_key_value_heads=n_kv_heads, vocab_size=vocab, intermediate_size=ffn, rope_theta=theta,
                       rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False,
                       initializer_range=init, attn_implementation="eager", torch_dtype="float32")


def rope_theta(cfg) -> float:
    """transformers 4.x keeps rope_theta on the config; 5.x moved it into rope_parameters."""
    theta = getattr(cfg, "rope_theta", None)
    return float(theta if theta is not None else cfg.rope_parameters["rope_theta"])


def tiny_hf_model(seed=0, **kw):
    """A random LlamaForCausalLM in float32 (eager attention). Norm weights are randomised too (HF inits them to
    ones, which would hide a swapped norm)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_hf_config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def save_hf(model, folder, kind="safetensors", max_shard_size=None, dtype=None):
    """kind: "safetensors" (single file, no index), "sharded" (safetensors + model.safetensors.index.json),
    "bin" (pytorch_model.bin)."""
    os.makedirs(folder, exist_ok=True)
    if dtype is not None:  # a copy: .to(dtype) and back would round the caller's float32 weights
        import copy
        model = copy.deepcopy(model).to(dtype)
    if kind == "safetensors":
        model.save_pretrained(folder, safe_serialization=True, max_shard_size="10GB")
    elif kind == "sharded":
        model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size or "3MB")
    elif kind == "bin":
        model.save_pretrained(folder, safe_serialization=False, max_shard_size="10GB")
    else:
        raise ValueError(kind)
    return folder


def meta_state_dict(model) -> dict[str, torch.Tensor]:
    """Consolidated Meta state dict of an HF model: names of §1.7 backwards, q/k rows un-permuted."""
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        meta = hf_to_meta_name(name)
        if meta is None:
            continue
        t = t.detach().clone()
        if meta.endswith("attention.wq.weight"):
            t = permute_for_meta(t, cfg.num_attention_heads)
        elif meta.endswith("attention.wk.weight"):
            t = permute_for_meta(t, cfg.num_key_value_heads)
        out[meta] = t
    return out


def _suffix(name: str) -> str:
    return name.rsplit(".", 2)[-2] if name.startswith("layers.") else name.split(".")[0]


def shard_meta(sd: dict[str, torch.Tensor], mp: int) -> list[dict[str, torch.Tensor]]:
    """Splits a consolidated state dict the way fairscale's layers hold it on mp ranks (SPEC §1.6)."""
    shards = [{} for _ in range(mp)]
    for name, t in sd.items():
        dim = META_SPLIT_DIM[_suffix(name)]
        parts = [t] * mp if dim is None else list(t.chunk(mp, dim=dim))
        assert dim is None or all(p.shape[dim] * mp == t.shape[dim] for p in parts), name
        for s in range(mp):
            shards[s][name] = parts[s].clone().contiguous()
    return shards


def save_meta(model, folder, mp=1, dtype=None, vocab_in_params=False, rope_freqs=True, multiple_of=None):
    """Writes params.json + consolidated.NN.pth (mp shards). FFN size must follow Meta's formula: multiple_of is
    chosen (or given) so that it does."""
    from codellama_ext.config import ffn_hidden_size
    cfg = model.config
    os.makedirs(folder, exist_ok=True)
    if multiple_of is None:
        multiple_of = next(m for m in (256, 128, 64, 32, 16, 8)
                           if ffn_hidden_size(cfg.hidden_size, m, None) == cfg.intermediate_size)
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
              "multiple_of": multiple_of, "norm_eps": cfg.rms_norm_eps, "rope_theta": rope_theta(cfg)}
    if cfg.num_key_value_heads != cfg.num_attention_heads:
        params["n_kv_heads"] = cfg.num_key_value_heads
    if vocab_in_params:
        params["vocab_size"] = cfg.vocab_size
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f)
    sd = meta_state_dict(model)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    for s, shard in enumerate(shard_meta(sd, mp)):
        if rope_freqs:
            hd = cfg.hidden_size // cfg.num_attention_heads
            shard["rope.freqs"] = 1.0 / rope_theta(cfg) ** (torch.arange(0, hd, 2).float() / hd)
        torch.save(shard, os.path.join(folder, f"consolidated.{s:02d}.pth"))
    return folder

"""decoder_layers (the model's layer loop as one op) against codellama_ext.reference.decoder_layers, on every
device: both outputs and the appended cache rows within the baseline tolerance, no other cache row touched, and
the op's own argument checks. The model tests (tests/test_model.py) check the whole forward against transformers."""

import pytest
import torch

from codellama_ext import ops, reference
from conftest import DTYPES, assert_close_to_baseline, poison

LAYERS, DIM, HQ, HKV, D, FFN = 2, 256, 4, 2, 64, 320  # head_dim 64: the CUDA attention kernels take 64 / 128
BATCH, CAP = 3, 16


def i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def layer_tensors(dtype, device, quantize, seed=0):
    """weights (6 per layer) and scales (4 per layer when int8) in the op's order, random, unit-scale outputs."""
    g = torch.Generator().manual_seed(seed)
    weights, scales = [], []
    for _ in range(LAYERS):
        shapes = [((HQ + 2 * HKV) * D, DIM), (DIM, HQ * D), (2 * FFN, DIM), (DIM, FFN)]
        mats = [torch.randn(shape, generator=g) / shape[1] ** 0.5 for shape in shapes]
        norms = [(1 + 0.1 * torch.randn(DIM, generator=g)).to(dtype) for _ in range(2)]
        if quantize:
            pairs = [ops.quantize_int8(m, 0) for m in mats]
            mats = [q for q, _ in pairs]
            scales += [s.to(device) for _, s in pairs]
        else:
            mats = [m.to(dtype) for m in mats]
        weights += [norms[0], mats[0], mats[1], norms[1], mats[2], mats[3]]
    return [w.to(device) for w in weights], scales


def case(mode, device):
    """Token coordinates and the op's attention arguments. decode: 3 sequences, one token each, in slots 2, 0, 1
    with 5, 9 and 0 cached positions; prefill: 5 tokens from position 0 in slot 1, 3 from position 4 in slot 0."""
    if mode == "decode":
        slots, positions = [2, 0, 1], [5, 9, 0]
        return slots, positions, slots, dict(seq_lens=i32([p + 1 for p in positions], device))
    lens, starts, slots = [5, 3], [0, 4], [1, 0]
    token_slots = [s for s, n in zip(slots, lens) for _ in range(n)]
    positions = [p0 + t for p0, n in zip(starts, lens) for t in range(n)]
    return token_slots, positions, slots, dict(cu_seqlens=i32([0, 5, 8], device), start_pos=i32(starts, device),
                                               max_query_len=max(lens))


def caches(dtype, device, token_slots, positions, seed=1):
    """Random rows at the positions before each sequence's tokens, NaN everywhere else."""
    g = torch.Generator().manual_seed(seed)
    kc = poison(torch.empty(LAYERS, BATCH, CAP, HKV, D, dtype=dtype))
    vc = poison(torch.empty_like(kc))
    first = {}
    for s, p in zip(token_slots, positions):
        first[s] = min(p, first.get(s, p))
    for s, n in first.items():
        kc[:, s, :n] = torch.randn(LAYERS, n, HKV, D, generator=g).to(dtype)
        vc[:, s, :n] = torch.randn(LAYERS, n, HKV, D, generator=g).to(dtype)
    return kc.to(device), vc.to(device)


def run(fn, x, weights, scales, kc, vc, token_slots, positions, slots, attention, device):
    kc, vc = kc.clone(), vc.clone()
    out = fn(x, weights, scales, kc, vc, i32(positions, device), i32(token_slots, device), i32(slots, device),
             eps=1e-5, theta=1e6, interleaved=True, **attention)
    return out, kc, vc


@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decoder_layers_match_reference(device, dtype, quantize, mode):
    token_slots, positions, slots, attention = case(mode, device)
    weights, scales = layer_tensors(dtype, device, quantize)
    kc, vc = caches(dtype, device, token_slots, positions)
    x = torch.randn(len(positions), DIM, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    args = (token_slots, positions, slots, attention, device)
    (out, res), kc_out, vc_out = run(ops.decoder_layers, x, weights, scales, kc, vc, *args)
    (out_l, res_l), kc_l, vc_l = run(reference.decoder_layers, x, weights, scales, kc, vc, *args)
    # the truth: the reference in float64 (int8 weights stay int8, their scales float32)
    wide = [w if w.dtype == torch.int8 else w.double() for w in weights]
    (out_t, res_t), kc_t, vc_t = run(reference.decoder_layers, x.double(), wide, scales, kc.double(), vc.double(),
                                     *args)
    name = f"{mode} {dtype} int8={quantize}"
    assert_close_to_baseline(out, out_l, out_t, factor=2.0, floor=1e-5, name=f"{name} out")
    assert_close_to_baseline(res, res_l, res_t, factor=2.0, floor=1e-5, name=f"{name} residual")
    written = torch.zeros(BATCH, CAP, dtype=torch.bool)
    written[token_slots, positions] = True
    for got, low, truth in ((kc_out, kc_l, kc_t), (vc_out, vc_l, vc_t)):
        assert_close_to_baseline(got[:, written], low[:, written], truth[:, written], factor=2.0, floor=1e-5,
                                 name=f"{name} cache rows")
        before = kc if got is kc_out else vc
        assert torch.equal(got[:, ~written].isnan(), before[:, ~written].isnan())  # nothing else written
        assert torch.equal(got[:, ~written].nan_to_num(), before[:, ~written].nan_to_num())


def test_decoder_layers_opcheck():
    token_slots, positions, slots, attention = case("decode", "cpu")
    weights, scales = layer_tensors(torch.float32, "cpu", quantize=False)
    kc, vc = caches(torch.float32, "cpu", token_slots, positions)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()  # opcheck compares outputs of repeated runs
    x = torch.randn(len(positions), DIM)
    torch.library.opcheck(torch.ops.codellama.decoder_layers.default,
                          (x, weights, scales, kc, vc, i32(positions, "cpu"), i32(token_slots, "cpu"),
                           i32(slots, "cpu"), attention["seq_lens"], None, None, 0, 1e-5, 1e6, True))


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(weights=a["weights"][:-1]), "weights must hold 6 tensors per layer"),
    (lambda a: a.update(scales=a["scales"][:3]), "scales must be empty or hold 4 tensors per layer"),
    (lambda a: a.update(cu_seqlens=a["seq_lens"]), "give either seq_lens .decode. or cu_seqlens and start_pos"),
    (lambda a: a.pop("seq_lens"), "give either seq_lens .decode. or cu_seqlens and start_pos"),
    (lambda a: a.update(k_cache=a["k_cache"][0]), r"k_cache must be 5-D \[layers, batch"),
    (lambda a: a.update(v_cache=a["v_cache"][:1]), "k_cache and v_cache must hold the same number"),
    (lambda a: a.update(x=a["x"][0]), r"x must be 2-D \[tokens, dim\]"),
    (lambda a: a["weights"].__setitem__(1, a["weights"][1][:D]), r"wqkv \(weights\[1\]\) must be"),
    (lambda a: a["weights"].__setitem__(7, a["weights"][7][:, :DIM // 2]), "linear_int8: qweight.shape"),
    (lambda a: a["token_slots"].__setitem__(0, 7), r"slots\[0\] = 7 is beyond the number of cache slots Bc = 3"),
    (lambda a: a["seq_lens"].__setitem__(1, 99), r"seq_lens\[1\] = 99 must be in \[1, S\] with S = 16"),
])
def test_decoder_layers_errors(change, match):
    token_slots, positions, slots, attention = case("decode", "cpu")
    weights, scales = layer_tensors(torch.float32, "cpu", quantize=True)
    kc, vc = caches(torch.float32, "cpu", token_slots, positions)
    a = dict(x=torch.randn(len(positions), DIM), weights=weights, scales=scales, k_cache=kc, v_cache=vc,
             positions=i32(positions, "cpu"), token_slots=i32(token_slots, "cpu"), slots=i32(slots, "cpu"),
             **attention)
    change(a)
    with pytest.raises(ValueError, match=match):
        ops.decoder_layers(**a)


def test_index_checks_skipped_only_inside_the_call():
    # decoder_layers checks the index values in its first layer only; afterwards every op checks them again
    token_slots, positions, slots, attention = case("decode", "cpu")
    weights, scales = layer_tensors(torch.float32, "cpu", quantize=False)
    kc, vc = caches(torch.float32, "cpu", token_slots, positions)
    ops.decoder_layers(torch.randn(len(positions), DIM), weights, scales, kc, vc, i32(positions, "cpu"),
                       i32(token_slots, "cpu"), i32(slots, "cpu"), **attention)
    k = torch.randn(1, HKV, D)
    with pytest.raises(ValueError, match=r"slots\[0\] = 3 is beyond"):
        ops.kv_cache_append(k, k, kc[0], vc[0], i32([3], "cpu"), i32([0], "cpu"))

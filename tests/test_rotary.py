"""rotary_embedding (in place) against codellama_ext.reference.rotary_embedding, both layouts, every device."""

import pytest
import torch

from codellama_ext import ops, reference
from conftest import DTYPES, assert_close_to_baseline


def _rotate(q, k, pos, theta, interleaved):
    q2, k2 = q.clone(), k.clone()
    ops.rotary_embedding(q2, k2, pos, theta, interleaved)
    return q2, k2


def _check(q, k, pos, theta, interleaved, name):
    out_q, out_k = _rotate(q, k, pos, theta, interleaved)
    ref_q, ref_k = reference.rotary_embedding(q, k, pos, theta, interleaved)
    true_q, true_k = reference.rotary_embedding(q.double(), k.double(), pos, theta, interleaved)
    # floor 1e-6 of max|x|: fp32 cos/sin of the same fp32 angles may differ by an ulp between libms
    assert_close_to_baseline(out_q, ref_q, true_q, name=f"{name} q")
    assert_close_to_baseline(out_k, ref_k, true_k, name=f"{name} k")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [8, 64, 128])
@pytest.mark.parametrize("theta", [1e4, 1e6])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("t", [37, 200])  # the CUDA kernel's two launch shapes: pair blocks below 128 tokens
def test_rotary_matches_reference(device, dtype, head_dim, theta, interleaved, t):
    g = torch.Generator().manual_seed(head_dim)
    hq, hkv = 4, 2
    q = torch.randn(t, hq, head_dim, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(t, hkv, head_dim, generator=g).to(device=device, dtype=dtype)
    pos = torch.randint(0, 16384, (t,), generator=g).to(device)
    pos[0] = 0
    _check(q, k, pos, theta, interleaved, f"rope {dtype} D{head_dim} theta{theta:g} inter{interleaved}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_rotary_strided_views_of_fused_qkv(device, dtype, interleaved, pos_dtype):
    """q and k as slices of a fused QKV projection [T, (Hq + 2 Hkv) * D]; v must stay untouched."""
    t, hq, hkv, d = 19, 8, 2, 128
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=device, dtype=dtype)
    before = qkv.clone()
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
    pos = torch.arange(100, 100 + t, device=device, dtype=pos_dtype)
    ref_q, ref_k = reference.rotary_embedding(q, k, pos, 1e6, interleaved)
    true_q, true_k = reference.rotary_embedding(q.double(), k.double(), pos, 1e6, interleaved)
    ops.rotary_embedding(q, k, pos, 1e6, interleaved)
    assert_close_to_baseline(q, ref_q, true_q, name="strided q")
    assert_close_to_baseline(k, ref_k, true_k, name="strided k")
    assert torch.equal(qkv[:, (hq + hkv) * d:], before[:, (hq + hkv) * d:]), "v was modified"


def test_rotary_codellama_prefill_shape(device):
    """CodeLlama-34B heads (64 query over 8 kv, D 128) at theta 1e6, positions up to 16k, bf16."""
    t = 64
    q = torch.randn(t, 64, 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(t, 8, 128, device=device, dtype=torch.bfloat16)
    pos = torch.randint(0, 16384, (t,), device=device)
    _check(q, k, pos, 1e6, True, "rope 34B")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_permutation_turns_interleaved_into_rotate_half(device, dtype):
    """SPEC.md §1.7 / STYLE habit 6: permute(q) then rotate-half == permute(interleaved rotation of q)."""
    t, h, d = 11, 3, 64
    q = torch.randn(t, h, d, device=device, dtype=dtype)
    k = torch.randn(t, 1, d, device=device, dtype=dtype)
    pos = torch.randint(0, 4096, (t,), device=device, dtype=torch.int32)
    meta_q, meta_k = _rotate(q, k, pos, 1e6, True)
    hf_q, hf_k = _rotate(reference.hf_permute_heads(q), reference.hf_permute_heads(k), pos, 1e6, False)
    # the same fp32 arithmetic on the same pairs: bitwise equal
    assert torch.equal(hf_q, reference.hf_permute_heads(meta_q))
    assert torch.equal(hf_k, reference.hf_permute_heads(meta_k))
    # and the references agree with each other too
    rq, _ = reference.rotary_embedding(reference.hf_permute_heads(q), k, pos, 1e6, False)
    mq, _ = reference.rotary_embedding(q, k, pos, 1e6, True)
    torch.testing.assert_close(rq, reference.hf_permute_heads(mq), rtol=1e-2, atol=1e-2)


def test_rotary_inv_freq_matches_torch():
    """The kernel's inv_freq formula (fp32 exponent, correctly rounded pow, fp32 reciprocal) agrees with torch's
    fp32 `theta ** x` to 1 ulp (torch's vectorised powf differs in 1 of 64 entries for D=128, theta=1e6);
    position 1 with (1, 0) pairs exposes cos/sin of the kernel's inv_freq itself."""
    for d in (8, 64, 128):
        for theta in (1e4, 1e6):
            ref = reference.rope_inv_freq(d, theta)
            exponent = (torch.arange(0, d, 2).float() / d).double()
            ours = (1.0 / (theta ** exponent).float())
            ulp = torch.nextafter(ref, torch.full_like(ref, 2.0)) - ref
            assert ((ours - ref).abs() <= ulp).all(), (d, theta)
            assert (ours != ref).sum() <= 1, (d, theta)
            q = torch.zeros(1, 1, d)
            q[0, 0, 0::2] = 1.0  # (1, 0) pairs -> (cos, sin) of the angle inv_freq[i] * 1
            k = torch.zeros(1, 1, d)
            ops.rotary_embedding(q, k, torch.ones(1, dtype=torch.int32), theta, True)
            torch.testing.assert_close(q[0, 0, 0::2], torch.cos(ours), rtol=0, atol=1.2e-7)
            torch.testing.assert_close(q[0, 0, 1::2], torch.sin(ours), rtol=0, atol=1.2e-7)


def test_rotary_empty_and_zero_position(device):
    q = torch.randn(0, 2, 8, device=device)
    ops.rotary_embedding(q, q.clone()[:, :1], torch.zeros(0, dtype=torch.int32, device=device), 1e4, True)
    q = torch.randn(3, 2, 8, device=device)
    k = torch.randn(3, 1, 8, device=device)
    q2, k2 = _rotate(q, k, torch.zeros(3, dtype=torch.int64, device=device), 1e4, False)
    assert torch.equal(q2, q) and torch.equal(k2, k)


def test_rotary_bad_input(device):
    q = torch.randn(4, 2, 8, device=device)
    k = torch.randn(4, 1, 8, device=device)
    pos = torch.arange(4, device=device, dtype=torch.int32)
    with pytest.raises(ValueError, match="head_dim .* must be even"):
        ops.rotary_embedding(q[..., :7], k[..., :7], pos, 1e4, True)
    with pytest.raises(ValueError, match="k must have the dtype of q"):
        ops.rotary_embedding(q, k.half(), pos, 1e4, True)
    with pytest.raises(ValueError, match="q must be float32, float16 or bfloat16"):
        ops.rotary_embedding(q.int(), k.int(), pos, 1e4, True)
    with pytest.raises(ValueError, match="q must be 3-D"):
        ops.rotary_embedding(q.view(4, 16), k, pos, 1e4, True)
    with pytest.raises(ValueError, match="k.shape\\[0\\] must equal the number of tokens"):
        ops.rotary_embedding(q, k[:3], pos, 1e4, True)
    with pytest.raises(ValueError, match="k.shape\\[2\\] must equal the head_dim"):
        ops.rotary_embedding(q, torch.randn(4, 1, 6, device=device), pos, 1e4, True)
    with pytest.raises(ValueError, match="q must have a contiguous last dimension"):
        ops.rotary_embedding(q.transpose(1, 2).contiguous().transpose(1, 2), k, pos, 1e4, True)
    with pytest.raises(ValueError, match="positions must be int32 or int64"):
        ops.rotary_embedding(q, k, pos.float(), 1e4, True)
    with pytest.raises(ValueError, match="positions.shape\\[0\\] must equal"):
        ops.rotary_embedding(q, k, pos[:3], 1e4, True)
    with pytest.raises(ValueError, match="positions must be 1-D"):
        ops.rotary_embedding(q, k, pos.view(4, 1), 1e4, True)
    with pytest.raises(ValueError, match="theta must be positive"):
        ops.rotary_embedding(q, k, pos, 0.0, True)
    if device == "cpu":
        with pytest.raises(ValueError, match="positions must be >= 0"):
            ops.rotary_embedding(q, k, pos - 2, 1e4, True)
        if torch.cuda.is_available():
            with pytest.raises(ValueError, match="must be on the device of q"):
                ops.rotary_embedding(q, k, pos.cuda(), 1e4, True)


def test_rotary_opcheck():
    q = torch.randn(5, 2, 16)
    k = torch.randn(5, 1, 16)
    pos = torch.arange(5, dtype=torch.int32)
    torch.library.opcheck(torch.ops.codellama.rotary_embedding.default, (q, k, pos, 1e4, True))
    torch.library.opcheck(torch.ops.codellama.rotary_embedding.default, (q, k, pos.long(), 1e6, False))

"""silu_and_mul against codellama_ext.reference.silu_and_mul (torch eager F.silu(gate) * up), every device."""

import pytest
import torch

from codellama_ext import ops, reference
from conftest import DTYPES, assert_close_to_baseline

# CodeLlama FFN widths (7B 11008, 13B 13824, 34B 22016) and odd sizes for the vector tails.
WIDTHS = [1, 13, 8, 100, 11008, 13824, 22016]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("f", WIDTHS)
@pytest.mark.parametrize("shape", [(1,), (3, 2)])
def test_silu_and_mul_matches_reference(device, dtype, f, shape):
    x = torch.randn(*shape, 2 * f, device=device, dtype=dtype) * 4
    out = ops.silu_and_mul(x)
    assert out.shape == (*shape, f) and out.dtype == dtype
    ref = reference.silu_and_mul(x)
    assert_close_to_baseline(out, ref, reference.silu_and_mul(x.double()), name=f"silu_and_mul {dtype} {f}")
    if dtype != torch.float32:
        # the double rounding of torch eager: nearly every element bitwise equal (an exp ulp may flip a rounding)
        mismatch = (out != ref).float().mean().item()
        assert mismatch < 1e-3, mismatch


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_same_bits_at_any_vector_width(device, dtype):
    """An element's result does not depend on where it sits in its row: rows of 5632 (16-lane vectors on AVX-512
    CPUs) equal bitwise the same elements fed as rows of 8 (8-lane vectors), out-of-range and NaN gates included."""
    rows, f = 8, 5632
    x = torch.randn(rows, 2 * f, device=device, dtype=dtype) * 4
    x[1, 17], x[2, 40], x[3, 1000], x[4, 77], x[5, 5] = 100.0, -200.0, float("nan"), float("inf"), 1e-7
    gate, up = x[:, :f].reshape(rows, f // 8, 8), x[:, f:].reshape(rows, f // 8, 8)
    by_eights = ops.silu_and_mul(torch.cat([gate, up], -1).reshape(-1, 16)).reshape(rows, f)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(ops.silu_and_mul(x).view(bits), by_eights.view(bits))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_extreme_values(device, dtype):
    vals = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 86.9, -86.9, 87.5, -87.5, 88.5, -88.5, 100.0,
                         -100.0, 1e4, -1e4, float("inf"), float("-inf")], dtype=torch.float32)
    if dtype == torch.float16:
        vals = vals.clamp(-6e4, 6e4)
    f = vals.numel()
    gate = vals.to(dtype)
    up = torch.full((f,), 1.5, dtype=dtype)
    x = torch.cat([gate, up]).to(device)[None].repeat(2, 1)
    out = ops.silu_and_mul(x)
    ref = reference.silu_and_mul(x)
    torch.testing.assert_close(out, ref, rtol=1e-6 if dtype == torch.float32 else 0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_long_row_independent_of_threads(device, dtype):
    """One row is split over threads when F is large (CPU: from 32768). The exp of the 8-wide path and the scalar
    tail's differ by an ulp, so a split whose pieces start off a multiple of 8 changed elements with the thread
    count (F = 40003 split at 20001). The row must equal itself computed in a batch of two (never split) at 1 and
    2 threads. Seed 1 gave a changed fp32 element at index 20000 before the fix."""
    f = 40003
    torch.manual_seed(1)
    x = (torch.randn(1, 2 * f) * 5).to(device=device, dtype=dtype)
    unsplit = ops.silu_and_mul(torch.cat([x, x]))[:1]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = ops.silu_and_mul(x)
            assert torch.equal(out, unsplit), f"{n} threads: {(out != unsplit).nonzero()[:, 1].tolist()}"
    finally:
        torch.set_num_threads(threads)


def test_silu_and_mul_strided_rows(device):
    buf = torch.randn(5, 3 * 26, device=device, dtype=torch.bfloat16)
    x = buf[:, :52]  # row stride 78, rows contiguous
    torch.testing.assert_close(ops.silu_and_mul(x), reference.silu_and_mul(x), rtol=0, atol=0)
    xt = torch.randn(52, 5, device=device).t()  # last dim not contiguous: copied
    torch.testing.assert_close(ops.silu_and_mul(xt), reference.silu_and_mul(xt), rtol=1e-6, atol=1e-6)


def test_silu_and_mul_bad_input(device):
    x = torch.randn(2, 16, device=device)
    with pytest.raises(ValueError, match="last dimension of x must be even"):
        ops.silu_and_mul(x[:, :15])
    with pytest.raises(ValueError, match="last dimension of x must be even"):
        ops.silu_and_mul(x[:, :0])
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16"):
        ops.silu_and_mul(x.int())
    with pytest.raises(ValueError, match="at least one dimension"):
        ops.silu_and_mul(x[0, 0])
    assert ops.silu_and_mul(x[:0]).shape == (0, 8)


def test_silu_and_mul_opcheck():
    torch.library.opcheck(torch.ops.codellama.silu_and_mul.default, (torch.randn(3, 2, 40),))

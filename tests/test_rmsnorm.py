"""RMSNorm and the fused residual-add variant against codellama_ext.reference, on every device."""

import pytest
import torch

from codellama_ext import ops, reference
from conftest import DTYPES, assert_close_to_baseline

# CodeLlama widths (7B, 13B, 34B/70B) and odd sizes that exercise vector tails.
DIMS = [8, 127, 769, 4096, 5120, 8192, 5125]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("shape", [(1,), (3, 5)])
def test_rms_norm_matches_reference(device, dtype, dim, shape):
    x = torch.randn(*shape, dim, device=device, dtype=dtype) * 3
    w = torch.randn(dim, device=device, dtype=dtype)
    out = ops.rms_norm(x, w, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close_to_baseline(out, reference.rms_norm(x, w), reference.rms_norm(x.double(), w.double()),
                             name=f"rms_norm {dtype} {dim}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [127, 4096])
def test_rms_norm_strided_rows(device, dtype, dim):
    buf = torch.randn(4, 2 * dim, device=device, dtype=dtype)
    x = buf[:, :dim]  # rows with stride 2*dim
    w = torch.randn(dim, device=device, dtype=dtype)
    torch.testing.assert_close(ops.rms_norm(x, w), reference.rms_norm(x, w), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [127, 4096, 5125])
def test_fused_add_rms_norm(device, dtype, dim):
    x = torch.randn(7, dim, device=device, dtype=dtype)
    res = torch.randn(7, dim, device=device, dtype=dtype) * 4
    w = torch.randn(dim, device=device, dtype=dtype)
    out, new_res = ops.fused_add_rms_norm(x, res, w, 1e-5)
    ref_out, ref_res = reference.fused_add_rms_norm(x, res, w)
    torch.testing.assert_close(new_res, ref_res, rtol=0, atol=0)  # one rounding of an exact sum: bitwise
    assert_close_to_baseline(out, ref_out, reference.rms_norm(ref_res.double(), w.double()),
                             name=f"fused_add_rms_norm {dtype} {dim}")


def test_rms_norm_bad_input(device):
    x = torch.randn(2, 16, device=device)
    w = torch.randn(16, device=device)
    with pytest.raises(ValueError, match="weight.shape\\[0\\] must equal"):
        ops.rms_norm(x, w[:8])
    with pytest.raises(ValueError, match="weight must have the dtype of x"):
        ops.rms_norm(x, w.half())
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16"):
        ops.rms_norm(x.int(), w.int())
    with pytest.raises(ValueError, match="eps must be positive"):
        ops.rms_norm(x, w, 0.0)
    with pytest.raises(ValueError, match="weight must be 1-D"):
        ops.rms_norm(x, w.view(2, 8))
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        ops.fused_add_rms_norm(x, x[:1], w)
    with pytest.raises(ValueError, match="non-empty last dimension"):
        ops.rms_norm(x[:, :0], w[:0])
    if device == "cpu" and torch.cuda.is_available():
        with pytest.raises(ValueError, match="must be on the device of x"):
            ops.rms_norm(x, w.cuda())


def test_rms_norm_opcheck():
    x = torch.randn(3, 40)
    w = torch.randn(40)
    torch.library.opcheck(torch.ops.codellama.rms_norm.default, (x, w, 1e-5))
    torch.library.opcheck(torch.ops.codellama.fused_add_rms_norm.default, (x, x.clone(), w, 1e-5))

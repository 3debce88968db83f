"""linear, quantize_int8 and linear_int8 against codellama_ext.reference, on every device.

Few rows run our GEMV kernels, more a GEMM path (at::matmul; on CPU fp32 sgemm on converted blocks of W for int8
and, without native bf16/fp16 matmul, 16-bit weights; with AMX, oneDNN on bf16 blocks): the row sweep covers both
sides of each threshold (8, and on CPU _C.cpu_gemv_max_rows for each dtype; codellama/linear.h)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codellama_ext import _C, ops, reference
from conftest import DTYPES, assert_close_to_baseline

CPU_LIMITS = {_C.cpu_gemv_max_rows(str(dtype)[6:], int8) for dtype in DTYPES for int8 in (False, True)}
ROWS = sorted({1, 2, 5, 8, 9} | CPU_LIMITS | {limit + 1 for limit in CPU_LIMITS})
# (N, K): odd tails, a CodeLlama-7B width (4096), the FFN width 11008 on either side (down_proj-like K, and N).
SHAPES = [(11, 64), (127, 129), (256, 4096), (512, 11008), (11008, 128)]


def group_for(k: int, requested: int) -> int:
    """group_size 128 where it divides K, else a divisor that is not a multiple of 8 or 16 (the scalar paths)."""
    if requested == 0 or k % requested == 0:
        return requested
    return {64: 16, 129: 3}[k]


def floor_for(dtype):
    # fp32: both sides sum ~10^4 fp32 products in different orders; the baseline cannot show that noise.
    return 2e-6 if dtype == torch.float32 else 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_linear_matches_reference(device, dtype, m, n, k):
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
    out = ops.linear(x, w)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close_to_baseline(out, reference.linear(x, w), reference.linear(x.double(), w.double()),
                             floor=floor_for(dtype), name=f"linear {dtype} {m}x{k} -> {n}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [0, 128])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_linear_int8_matches_reference(device, dtype, m, n, k, group):
    gs = group_for(k, group)
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
    q, s = ops.quantize_int8(w, gs)
    out = ops.linear_int8(x, q, s)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close_to_baseline(out, reference.linear_int8(x, q, s), reference.linear_int8(x.double(), q, s),
                             floor=floor_for(dtype), name=f"linear_int8 {dtype} {m}x{k} -> {n} group {gs}")


# On a CPU with AMX-BF16, bf16 GEMMs of up to 256 rows run as y^T = W x^T and are transposed back
# (kCpuAmxTransposedMaxRows, codellama/linear.h): rows and widths off the transpose's 8 x 8 blocks, both sides.
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("n,k", [(127, 129), (11008, 128)])
@pytest.mark.parametrize("m", [13, 100, 256, 257])
def test_linear_gemm_rows_around_the_transposed_limit(device, m, n, k, int8):
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k ** 0.5
    if int8:
        q, s = ops.quantize_int8(w)
        out, ref = ops.linear_int8(x, q, s), reference.linear_int8(x, q, s)
        truth = reference.linear_int8(x.double(), q, s)
    else:
        out, ref, truth = ops.linear(x, w), reference.linear(x, w), reference.linear(x.double(), w.double())
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert_close_to_baseline(out, ref, truth, floor=floor_for(torch.bfloat16), name=f"{int8=} {m}x{k} -> {n}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,group", [(1040, 0), (1024, 128), (1024, 256), (1040, 80)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_linear_int8_outliers_within_a_block(device, dtype, m, k, group):
    """In the GEMV, 16-bit x meets int8 weights as int16 in 128-column blocks (one scale per block, the same rule on
    CPU and CUDA, codellama/linear.h): one element 300x the others in every block must not cost the rest of the
    block their precision, and a block of zeros must stay exact. K = 1040 with one group: 8 full blocks and a
    16-column one (CUDA: the fp32 route, K % 128 != 0); groups of 80 columns do not hold whole blocks (the fp32
    route)."""
    n = 96
    x = torch.randn(m, k, device=device, dtype=dtype)
    x[:, 5::128] *= 300
    x[:, 256:384] = 0
    w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
    q, s = ops.quantize_int8(w, group)
    out = ops.linear_int8(x, q, s)
    assert_close_to_baseline(out, reference.linear_int8(x, q, s), reference.linear_int8(x.double(), q, s),
                             floor=floor_for(dtype), name=f"linear_int8 outliers {dtype} {m}x{k} group {group}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("m", [1, 2])
def test_linear_int8_non_finite_x(device, dtype, bad, m):
    """A NaN or inf in a row of x makes that row's outputs non-finite (torch gives NaN or +-inf) and leaves the
    other rows as they were (one row: the CPU's single-row kernel, dot_row_seq)."""
    x = torch.randn(m, 256, device=device, dtype=dtype)
    w = torch.randn(24, 256, device=device, dtype=dtype) / 16
    q, s = ops.quantize_int8(w, 128)
    clean = ops.linear_int8(x, q, s)
    x[-1, 200] = bad
    out = ops.linear_int8(x, q, s)
    assert not torch.isfinite(out[-1]).any()
    torch.testing.assert_close(out[:-1], clean[:-1], rtol=0, atol=0)


@pytest.mark.parametrize("group", [0, 128])
@pytest.mark.parametrize("m", [1, 3, 9])
def test_linear_int8_tiny_bf16_x(device, m, group):
    """bf16 reaches 1e-38: on CPU, x blocks with max |x| below ~1e-34 had a subnormal int16 scale whose reciprocal
    overflowed, every element became -32768 and the outputs were ~3x the truth with random signs (the int16 route
    now hands such x to the fp32 route, on CPU and CUDA). Scaling x by 2^-118 (exact: every |x| stays a normal
    bf16) must scale the output by 2^-118 with the error of unscaled x."""
    k, n = 256, 40
    x = torch.randn(m, k, device=device)
    x = (x.sign() * x.abs().clamp(0.01, 3.0)).bfloat16()
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k ** 0.5
    q, s = ops.quantize_int8(w, group)
    tiny = x * 2.0 ** -118
    assert torch.equal(tiny.double() * 2.0 ** 118, x.double())
    out = ops.linear_int8(tiny, q, s).double() * 2.0 ** 118
    assert_close_to_baseline(out, reference.linear_int8(x, q, s), reference.linear_int8(x.double(), q, s),
                             floor=1e-6, name=f"linear_int8 x * 2^-118, {m} rows, group {group}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [0, 128, 16, 3])
def test_quantize_int8_matches_reference(device, dtype, group):
    n, k = 37, 384
    w = torch.randn(n, k, device=device, dtype=dtype)
    w[3] = 0  # all-zero row / groups: scale 1, q 0
    w[5, :] *= 1e3
    q, s = ops.quantize_int8(w, group)
    q_ref, s_ref = reference.quantize_int8(w, group)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert s.shape == (n, 1 if group == 0 else k // group)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)
    assert (s[3] == 1).all() and (q[3] == 0).all()
    err = (reference.dequantize_int8(q, s) - w.float()).abs()
    assert (err <= (0.5 + 1e-4) * s.repeat_interleave(k // s.shape[1], dim=1)).all()  # + fp32 division noise


def test_quantize_int8_rounds_half_to_even(device):
    # max |w| = 127 -> scale exactly 1: w / scale are the values themselves
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 3.5, -126.5]], device=device)
    q, s = ops.quantize_int8(w, 0)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, -2, 0, 4, -126]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_batched_and_strided_x(device, dtype):
    k, n = 200, 45
    w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5  # outputs ~ N(0, 1): atol ~ a few bf16 ulps
    q, s = ops.quantize_int8(w, 8)
    for x in [torch.randn(2, 3, k, device=device, dtype=dtype),           # 3-D, 6 rows (GEMV)
              torch.randn(4, 2 * k, device=device, dtype=dtype)[:, :k],    # strided rows
              torch.randn(k, 5, device=device, dtype=dtype).T,             # last dim not contiguous
              torch.randn(3, 7, k, device=device, dtype=dtype)[:, ::2],    # 12 rows, GEMM path
              torch.randn(k, device=device, dtype=dtype)]:                 # 1-D
        out = ops.linear(x, w)
        assert out.shape == (*x.shape[:-1], n)
        torch.testing.assert_close(out, reference.linear(x, w), rtol=2e-2, atol=2e-2)
        out8 = ops.linear_int8(x, q, s)
        assert out8.shape == (*x.shape[:-1], n)
        torch.testing.assert_close(out8, reference.linear_int8(x, q, s), rtol=2e-2, atol=2e-2)


def test_linear_empty_rows(device):
    x = torch.randn(0, 16, device=device)
    w = torch.randn(5, 16, device=device)
    assert ops.linear(x, w).shape == (0, 5)
    q, s = ops.quantize_int8(w, 0)
    assert ops.linear_int8(x, q, s).shape == (0, 5)


def test_linear_bad_input(device):
    x = torch.randn(2, 16, device=device)
    w = torch.randn(8, 16, device=device)
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16"):
        ops.linear(x.int(), w.int())
    with pytest.raises(ValueError, match="weight must have the dtype of x"):
        ops.linear(x, w.half())
    with pytest.raises(ValueError, match="weight.shape\\[1\\] must equal K"):
        ops.linear(x, w[:, :8].contiguous())
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ops.linear(x, w.view(8, 2, 8))
    with pytest.raises(ValueError, match="weight must be contiguous"):
        ops.linear(x[:, :8], w.T)
    with pytest.raises(ValueError, match="non-empty last dimension"):
        ops.linear(x[:, :0], w[:, :0])
    with pytest.raises(ValueError, match="at least one dimension"):
        ops.linear(x[0, 0], w)
    if device == "cpu" and torch.cuda.is_available():
        with pytest.raises(ValueError, match="must be on the device of x"):
            ops.linear(x, w.cuda())


def test_quantize_int8_bad_input(device):
    w = torch.randn(8, 16, device=device)
    with pytest.raises(ValueError, match="group_size must be >= 0"):
        ops.quantize_int8(w, -1)
    with pytest.raises(ValueError, match="group_size must divide K"):
        ops.quantize_int8(w, 5)
    with pytest.raises(ValueError, match="weight must be float32, float16 or bfloat16"):
        ops.quantize_int8(w.int(), 0)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ops.quantize_int8(w.flatten(), 0)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        ops.quantize_int8(w.T, 0)
    with pytest.raises(ValueError, match="non-empty second dimension"):
        ops.quantize_int8(w[:, :0], 0)
    for bad in (float("nan"), float("inf")):
        w[3, 5] = bad
        with pytest.raises(ValueError, match="weight must be finite"):
            ops.quantize_int8(w, 0)


def test_linear_int8_bad_input(device):
    x = torch.randn(2, 16, device=device)
    q, s = ops.quantize_int8(torch.randn(8, 16, device=device), 4)
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16"):
        ops.linear_int8(x.int(), q, s)
    with pytest.raises(ValueError, match="qweight must be Char"):
        ops.linear_int8(x, q.float(), s)
    with pytest.raises(ValueError, match="qweight must be 2-D"):
        ops.linear_int8(x, q.flatten(), s)
    with pytest.raises(ValueError, match="qweight.shape\\[1\\] must equal K"):
        ops.linear_int8(x[:, :8], q, s)
    with pytest.raises(ValueError, match="qweight must be contiguous"):
        ops.linear_int8(x, torch.cat([q, q], 1)[:, :16], s)
    with pytest.raises(ValueError, match="scales must be Float"):
        ops.linear_int8(x, q, s.double())
    with pytest.raises(ValueError, match="scales must be 2-D"):
        ops.linear_int8(x, q, s.flatten())
    with pytest.raises(ValueError, match="scales.shape\\[0\\] must equal N"):
        ops.linear_int8(x, q, s[:4])
    with pytest.raises(ValueError, match="scales must be contiguous"):
        ops.linear_int8(x, q, torch.cat([s, s], 1)[:, ::2])
    with pytest.raises(ValueError, match="must divide K"):
        ops.linear_int8(x, q, torch.ones(8, 3, device=device))
    if device == "cpu" and torch.cuda.is_available():
        with pytest.raises(ValueError, match="must be on the device of x"):
            ops.linear_int8(x, q.cuda(), s.cuda())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("f,k,group", [(11008 // 2, 4096, 0), (48, 256, 128), (40, 200, 8), (5, 48, 0)])
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9])
def test_linear_silu_and_mul_equals_the_two_ops(device, dtype, m, f, k, group, int8):
    """The MLP gate in one op: bitwise the two ops it stands for (on CUDA decode rows one GEMV computes each gate row
    with its up row and applies silu_and_mul's roundings; the 16-byte, int16-x and element-wise GEMV paths all
    occur here: K = 200 with groups of 8 takes the element-wise one), and as close as torch's silu_and_mul of our
    projection, whose own accuracy the linear tests above check (a baseline on the composite is too noisy: the
    roundings between the ops turn one-ulp differences of the projection into several of the output). Rows past
    the GEMV's limit take the two ops."""
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(2 * f, k, device=device, dtype=dtype) / k ** 0.5
    if int8:
        q, s = ops.quantize_int8(w, group)
        out, projection = ops.linear_silu_and_mul(x, q, s), ops.linear_int8(x, q, s)
    else:
        out, projection = ops.linear_silu_and_mul(x, w), ops.linear(x, w)
    assert out.shape == (m, f) and out.dtype == dtype
    torch.testing.assert_close(out, ops.silu_and_mul(projection), rtol=0, atol=0)
    assert_close_to_baseline(out, reference.silu_and_mul(projection), reference.silu_and_mul(projection.double()),
                             name=f"linear_silu_and_mul int8={int8} {dtype} {m}x{k} -> {f}")


def test_linear_silu_and_mul_shapes_and_bad_input(device):
    x = torch.randn(2, 3, 16, device=device)
    w = torch.randn(10, 16, device=device)
    assert ops.linear_silu_and_mul(x, w).shape == (2, 3, 5)
    assert ops.linear_silu_and_mul(x[:, :0], w).shape == (2, 0, 5)
    q, s = ops.quantize_int8(w, 4)
    assert ops.linear_silu_and_mul(x[0, 0], q, s).shape == (5,)
    with pytest.raises(ValueError, match="weight must have an even, positive number of rows"):
        ops.linear_silu_and_mul(x, w[:9])
    with pytest.raises(ValueError, match="weight.shape\\[1\\] must equal K"):
        ops.linear_silu_and_mul(x[..., :8], w)
    with pytest.raises(ValueError, match="qweight must be Char"):
        ops.linear_silu_and_mul(x, w, s)
    with pytest.raises(ValueError, match="scales.shape\\[0\\] must equal N"):
        ops.linear_silu_and_mul(x, q, s[:4])


@pytest.mark.parametrize("m", [3, 12])  # GEMV and GEMM paths
def test_linear_opcheck(m):
    x = torch.randn(m, 40)
    w = torch.randn(24, 40)
    torch.library.opcheck(torch.ops.codellama.linear.default, (x, w))
    torch.library.opcheck(torch.ops.codellama.quantize_int8.default, (w, 8))
    q, s = ops.quantize_int8(w, 8)
    torch.library.opcheck(torch.ops.codellama.linear_int8.default, (x, q, s))
    torch.library.opcheck(torch.ops.codellama.linear_silu_and_mul.default, (x, w, None))
    torch.library.opcheck(torch.ops.codellama.linear_silu_and_mul.default, (x, q, s))


def test_cpu_int8_gemv_limit_by_shape():
    """int8 weights whose products run on AMX-INT8 tiles keep the GEMV to 64 rows (kCpuInt8TilesMaxRows); shapes
    the tiles do not take (N % 16, K % 64, fp32 x, groups splitting a 128-column x block) keep the shapeless limit."""
    for dtype in ("bfloat16", "float16"):
        plain = _C.cpu_gemv_max_rows(dtype, True)
        assert _C.cpu_gemv_max_rows(dtype, True, n=11008, k=4096) in (plain, 64)
        assert _C.cpu_gemv_max_rows(dtype, True, n=11008, k=4096, groups=32) in (plain, 64)
        for n, k, groups in [(11, 4096, 1), (11008, 4128, 1), (11008, 4096, 64)]:
            assert _C.cpu_gemv_max_rows(dtype, True, n=n, k=k, groups=groups) == plain, (dtype, n, k, groups)
    assert _C.cpu_gemv_max_rows("float32", True, n=11008, k=4096) == _C.cpu_gemv_max_rows("float32", True)


@pytest.mark.parametrize("weights", ["int8", "bf16"])
def test_gemv_crossover_tool_runs(weights):
    """tools/bench_gemv_crossover.py (the thresholds' measurement) on a tiny shape, so it cannot rot."""
    root = Path(__file__).resolve().parent.parent
    limit = _C.cpu_gemv_max_rows("bfloat16", weights == "int8", n=48, k=64)
    run = subprocess.run([sys.executable, str(root / "tools" / "bench_gemv_crossover.py"), "--weights", weights,
                          "--shape", "64", "48", "--rows", "1", str(limit + 2), "--rounds", "1"],
                         capture_output=True, text=True, timeout=300,
                         env=os.environ | {"PYTHONPATH": str(root)})
    assert run.returncode == 0, run.stderr
    assert f"shipped threshold {limit} rows" in run.stdout
    rows = [line.split("|")[1].strip() for line in run.stdout.splitlines() if line.startswith("| ") and
            line.split("|")[1].strip().isdigit()]
    assert rows == ["1", str(limit + 2)]

"""argmax and sample against codellama_ext.reference, every device; sampling at explicit uniforms."""

import pytest
import torch

from codellama_ext import ops, reference
from conftest import DTYPES


def _params(b, device, temperature=1.0, top_k=0, top_p=1.0, uniform=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.full((b,), float(temperature), dtype=torch.float32)
    k = torch.full((b,), int(top_k), dtype=torch.int32)
    p = torch.full((b,), float(top_p), dtype=torch.float32)
    u = torch.rand(b, generator=g) if uniform is None else torch.full((b,), float(uniform))
    return [x.to(device) for x in (t, k, p, u)]


# ---- argmax ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32016])
def test_argmax_matches_torch(device, dtype, vocab):
    logits = torch.randn(5, vocab, device=device).to(dtype)
    torch.testing.assert_close(ops.argmax(logits), reference.argmax(logits), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_ties_inf_nan(device, dtype):
    logits = torch.full((5, 2000), float("-inf"), dtype=dtype)
    logits[1, [3, 1500, 7]] = 2.0       # ties: first index wins
    logits[2, 1999] = float("inf")
    logits[2, 5] = 1.0
    logits[3] = 0.5
    logits[3, 1234] = float("nan")      # NaN counts as the largest (torch.argmax)
    logits[3, 1800] = float("nan")
    logits[4, 100:] = 3.0               # many equal maxima
    logits = logits.to(device)
    out = ops.argmax(logits)
    assert out.tolist() == [0, 3, 1999, 1234, 100]
    torch.testing.assert_close(out, reference.argmax(logits), rtol=0, atol=0)


def test_argmax_strided_rows(device):
    buf = torch.randn(4, 300, device=device)
    x = buf[:, :257]
    torch.testing.assert_close(ops.argmax(x), torch.argmax(x, -1), rtol=0, atol=0)


# ---- sample ----

@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_greedy_cases_equal_argmax(device, dtype):
    logits = (torch.randn(6, 1003) * 3).to(device=device, dtype=dtype)
    want = torch.argmax(logits.float(), -1)
    for temperature, top_k, top_p in [(0.0, 0, 1.0), (-1.0, 5, 0.5), (0.7, 1, 1.0), (1.0, 0, 0.0),
                                      (1.3, 50, -1.0)]:
        for u in (0.0, 0.5, 0.999999):
            args = _params(6, device, temperature, top_k, top_p, u)
            assert torch.equal(ops.sample(logits, *args), want), (temperature, top_k, top_p, u)


@pytest.mark.parametrize("vocab", [2, 50, 1000, 32016])
def test_sample_matches_reference(device, vocab):
    """Exact index equality with the reference on random fp32 logits over many (T, k, p, u)."""
    g = torch.Generator().manual_seed(vocab)
    combos = [(t, k, p) for t in (0.2, 0.8, 1.0, 1.7) for k in (0, 1, 3, 40, 2000, -5) for p in (0.05, 0.5, 0.9, 1.0)]
    b = len(combos)
    logits = (torch.randn(b, vocab, generator=g) * 3).to(device)
    t = torch.tensor([c[0] for c in combos], dtype=torch.float32, device=device)
    k = torch.tensor([c[1] for c in combos], dtype=torch.int32, device=device)
    p = torch.tensor([c[2] for c in combos], dtype=torch.float32, device=device)
    for trial in range(3 if vocab < 32016 else 1):
        u = torch.rand(b, generator=g).to(device)
        out = ops.sample(logits, t, k, p, u)
        want = reference.sample(logits.cpu(), t.cpu(), k.cpu(), p.cpu(), u.cpu())
        bad = (out.cpu() != want).nonzero().flatten().tolist()
        assert not bad, [(combos[i], float(u[i]), int(out[i]), int(want[i])) for i in bad]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sample_low_precision_logits_and_ties(device, dtype):
    """16-bit logits have many exact ties: the index-order tie rule must match the reference exactly."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(16, 3000, generator=g) * 2).to(dtype).to(device)
    t, k, p, u = _params(16, device, 0.9, 200, 0.95, seed=4)
    k[::2] = 0
    p[1::4] = 1.0
    out = ops.sample(logits, t, k, p, u)
    assert torch.equal(out.cpu(), reference.sample(logits.cpu(), t.cpu(), k.cpu(), p.cpu(), u.cpu()))


def test_sample_more_kept_than_one_chunk(device):
    """Flat distributions keep thousands of entries (the CUDA kernel walks several 1024-rank chunks)."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(8, 5000, generator=g) * 0.01).to(device)
    t, k, p, u = _params(8, device, 1.0, 0, 0.99, seed=6)
    k[4:] = 3000
    u[0], u[1] = 0.999, 0.0
    out = ops.sample(logits, t, k, p, u)
    assert torch.equal(out.cpu(), reference.sample(logits.cpu(), t.cpu(), k.cpu(), p.cpu(), u.cpu()))


def test_sample_peaked_rows_and_every_way_past_the_head(device):
    """Rows shaped like a language model's (a few likely tokens): the CUDA kernel answers most from the entries near
    the maximum (its head) and falls back to the chunk walk when top-k reaches past them, when the inverse CDF
    without top-p lands past them, or when they are more than 1024."""
    g = torch.Generator().manual_seed(11)
    v = 32016
    logits = torch.randn(12, v, generator=g) * 2
    top = torch.randint(0, v, (12, 20), generator=g)
    logits.scatter_add_(1, top, torch.full((12, 20), 12.0) + torch.randn(12, 20, generator=g))
    logits[5] = torch.randn(v, generator=g) * 0.01 - 17.5  # just past the head: ~1e-3 of the mass without top-p
    logits[5, 123] = 0.0
    logits[9:] = torch.randn(3, v, generator=g) * 0.05  # flat: thousands of entries near the maximum
    logits = logits.to(device)
    t, k, p, u = _params(12, device, 0.8, 0, 0.95, seed=12)
    t[3], t[4], t[5], t[6], t[7], t[8] = 0.2, 0.2, 1.0, 0.2, 0.2, 1.0
    k[2], k[3], k[4] = 5, 10, 2000  # top-k inside the head (with and without top-p), top-k past it
    p[3], p[5], p[6], p[8], p[10] = 1.0, 1.0, 1.0, 0.0, 1.0
    u[5], u[6] = 0.9999, 0.3  # without top-p: the inverse CDF past the head, and inside it
    out = ops.sample(logits, t, k, p, u)
    assert torch.equal(out.cpu(), reference.sample(logits.cpu(), t.cpu(), k.cpu(), p.cpu(), u.cpu()))


def test_sample_wide_nucleus(device):
    """Nuclei of hundreds to thousands of entries: heads of up to 2048 (two per CUDA thread) and past them."""
    g = torch.Generator().manual_seed(13)
    logits = (torch.randn(6, 32016, generator=g) * 3).to(device)
    t, k, p, u = _params(6, device, 0.8, 0, 0.95, seed=14)
    p[1], p[2], p[3] = 0.9, 0.99, 1.0
    t[4], k[5] = 1.2, 1500
    out = ops.sample(logits, t, k, p, u)
    assert torch.equal(out.cpu(), reference.sample(logits.cpu(), t.cpu(), k.cpu(), p.cpu(), u.cpu()))


def test_sample_distribution(device):
    """Frequencies over 20000 uniforms follow softmax(logits / T) restricted by top-k / top-p."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0, 0.2, -0.3]], device=device)
    n = 20000
    cases = [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.0, 0, 0.8)]
    for temperature, top_k, top_p in cases:
        rows = logits.expand(n, -1).contiguous()
        t, k, p, _ = _params(n, device, temperature, top_k, top_p)
        u = (torch.arange(n, dtype=torch.float64) + 0.5).div(n).float()[torch.randperm(n)].to(device)
        counts = torch.bincount(ops.sample(rows, t, k, p, u).cpu(), minlength=8).double()
        probs = torch.softmax(logits[0].cpu().double() / temperature, -1)
        order = torch.sort(probs, descending=True).indices
        keep = torch.zeros(8, dtype=torch.bool)
        kk = top_k if top_k > 0 else 8
        keep[order[:kk]] = True
        pk = torch.where(keep, probs, 0)
        pk = pk / pk.sum()
        sp = pk[order]
        before = sp.cumsum(0) - sp
        pk[order[before > top_p]] = 0
        pk = pk / pk.sum()
        expected = pk * n
        # stratified uniforms: each count is within ~1 of n * p
        assert (counts - expected).abs().max() <= 2, (temperature, top_k, top_p, counts, expected)
        assert counts[pk == 0].sum() == 0


def test_sample_reproducible_and_with_generator(device):
    logits = torch.randn(4, 500, device=device)
    t, k, p, u = _params(4, device, 0.8, 20, 0.9)
    a = ops.sample(logits, t, k, p, u)
    assert torch.equal(a, ops.sample(logits, t, k, p, u.clone()))
    g1 = torch.Generator(device=device).manual_seed(7)
    g2 = torch.Generator(device=device).manual_seed(7)
    assert torch.equal(ops.sample_with_generator(logits, t, k, p, g1), ops.sample_with_generator(logits, t, k, p, g2))


def test_sample_bad_input(device):
    logits = torch.randn(3, 10, device=device)
    t, k, p, u = _params(3, device)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        ops.sample(logits[0], t, k, p, u)
    with pytest.raises(ValueError, match="logits must be float32, float16 or bfloat16"):
        ops.sample(logits.double(), t, k, p, u)
    with pytest.raises(ValueError, match="non-empty vocabulary"):
        ops.sample(logits[:, :0], t, k, p, u)
    with pytest.raises(ValueError, match="temperature must be Float"):
        ops.sample(logits, t.double(), k, p, u)
    with pytest.raises(ValueError, match="top_k must be Int"):
        ops.sample(logits, t, k.long(), p, u)
    with pytest.raises(ValueError, match="top_p.shape\\[0\\] must equal the batch size"):
        ops.sample(logits, t, k, p[:2], u)
    with pytest.raises(ValueError, match="uniform must be 1-D"):
        ops.sample(logits, t, k, p, u.view(3, 1))
    with pytest.raises(ValueError, match="uniform must be contiguous"):
        ops.sample(logits, t, k, p, torch.rand(6, device=device)[::2])
    with pytest.raises(ValueError, match="logits must have a contiguous last dimension"):
        ops.sample(logits.t().contiguous().t(), t, k, p, u)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        ops.argmax(logits[0])
    with pytest.raises(ValueError, match="logits must be float32, float16 or bfloat16"):
        ops.argmax(logits.long())
    if device == "cpu" and torch.cuda.is_available():
        with pytest.raises(ValueError, match="must be on the device of logits"):
            ops.sample(logits, t.cuda(), k, p, u)
    assert ops.sample(logits[:0], t[:0], k[:0], p[:0], u[:0]).shape == (0,)


def test_sampling_opcheck():
    logits = torch.randn(3, 40)
    t, k, p, u = _params(3, "cpu", 0.8, 5, 0.9)
    torch.library.opcheck(torch.ops.codellama.argmax.default, (logits,))
    torch.library.opcheck(torch.ops.codellama.sample.default, (logits, t, k, p, u))

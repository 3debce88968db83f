"""Shared test fixtures: the device parametrisation (CUDA cases skip per test without a GPU) and the
baseline tolerance rule (STYLE.md habit 12)."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device and a CUDA build of the extension")


def pytest_collection_modifyitems(config, items):
    # Decided per test at run time, never at import: build machines have no GPU.
    have_cuda = torch.cuda.is_available()
    if have_cuda:
        from codellama_ext import _C
        have_cuda = _C.with_cuda
    for item in items:
        if "cuda" in item.keywords and not have_cuda:
            item.add_marker(pytest.mark.skip(reason="no CUDA device, or extension built without CUDA"))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fills t with NaN so an element the kernel forgot to write shows up."""
    return t.fill_(float("nan"))


def assert_close_to_baseline(out: torch.Tensor, ref_lowp: torch.Tensor, ref_fp64: torch.Tensor,
                             factor: float = 2.0, floor: float = 1e-6, name: str = "") -> None:
    """out must be as close to the fp64 truth as plain torch at the same precision is, within `factor`.

    ref_lowp is the reference run in the kernel's dtype (torch's own low-precision error); ref_fp64 the
    reference in float64. `floor` is relative to the largest |truth|: float32 summation-order noise that
    a float32 baseline (almost exact) cannot show. Max and mean errors are printed before asserting (pytest -s shows them)."""
    truth = ref_fp64.double()
    floor = floor * max(1.0, truth.abs().max().item()) if truth.numel() else floor
    err = (out.double() - truth).abs()
    base = (ref_lowp.double() - truth).abs()
    assert not torch.isnan(out).any(), f"{name}: output has NaN (unwritten elements?)"
    print(f"{name}: max err {err.max().item():.3g} (torch {base.max().item():.3g}), "
          f"mean err {err.mean().item():.3g} (torch {base.mean().item():.3g})")
    assert err.max().item() <= factor * base.max().item() + floor, name
    assert err.mean().item() <= factor * base.mean().item() + floor, name

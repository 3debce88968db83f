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

"""float64 oracle of the INT8/FP8 GEMM epilogue: out = acc * scale_a * scale_b + bias.

Shapes as in shared/DESIGN.md: scale_a per token ([M,1] | [M] | scalar), scale_b per channel
([1,N] | [N] | scalar), bias [N] | [1,N] | None. The exact value is computed in float64 (every input
is at most float32, so products and sums of three terms are exact to well under float32 ulp) and
rounded once to the output dtype.
"""

from __future__ import annotations

import torch


def _column(scale: torch.Tensor, m: int) -> torch.Tensor:
    s = scale.detach().to(torch.float64)
    return s.reshape(1, 1) if s.numel() == 1 else s.reshape(m, 1)


def _row(v: torch.Tensor, n: int) -> torch.Tensor:
    v = v.detach().to(torch.float64)
    return v.reshape(1, 1) if v.numel() == 1 else v.reshape(1, n)


def dequant_bias_exact(acc, scale_a, scale_b, bias=None) -> torch.Tensor:
    """The float64 value of acc * scale_a * scale_b + bias, before any rounding."""
    m, n = acc.shape
    out = acc.detach().to(torch.float64) * _column(scale_a, m) * _row(scale_b, n)
    if bias is not None:
        out = out + _row(bias, n)
    return out


def dequant_bias(acc, scale_a, scale_b, bias=None, *, out_dtype=torch.bfloat16) -> torch.Tensor:
    """The oracle's answer: the float64 value rounded once to `out_dtype`."""
    return dequant_bias_exact(acc, scale_a, scale_b, bias).to(out_dtype)


def dequant_bias_eager(acc, scale_a, scale_b, bias=None, *, out_dtype=torch.bfloat16) -> torch.Tensor:
    """The 5-op PyTorch eager version from the seed (upcast, two scalings, bias, downcast): a baseline."""
    out = acc.to(torch.float32)
    out = out * scale_a.to(torch.float32)
    out = out * scale_b.to(torch.float32)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def dequant_bias_expression(acc, scale_a, scale_b, bias=None, *, out_dtype=torch.bfloat16) -> torch.Tensor:
    """The one-expression eager version; also what torch.compile is given as its baseline."""
    out = acc.float() * scale_a.float() * scale_b.float()
    return (out + bias.float() if bias is not None else out).to(out_dtype)

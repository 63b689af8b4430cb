"""Oracle of the fused 4-bit linear: ``x.float() @ dequant(W).float().T + bias`` (the reference dequantizer's W).

The weight is exactly what `dequantize_4bit` returns (the numpy oracle), so a kernel that accumulates in
fp32 is judged against this float64-free fp32 oracle only through the K-aware matmul policy in
tritonbits_harness.tolerance (`assert_matmul`, which recomputes in float64 from the same W).
"""

from __future__ import annotations

import torch

from .dequantize_4bit import dequantize_4bit


def dequantized_weight(weight: torch.Tensor, quant_state) -> torch.Tensor:
    """The [N, K] weight the linear multiplies (CPU tensor, quant_state.dtype)."""
    return dequantize_4bit(weight, quant_state).reshape(tuple(quant_state.shape))


def linear_4bit(x: torch.Tensor, weight: torch.Tensor, quant_state, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 oracle on CPU: x.float() @ W.float().T (+ bias.float()); returns float32 [..., N]."""
    w = dequantized_weight(weight, quant_state).float()
    out = x.detach().cpu().float() @ w.T
    if bias is not None:
        out = out + bias.detach().cpu().float()
    return out

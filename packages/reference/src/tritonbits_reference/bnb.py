"""Adapters between duck-typed quant states and real bitsandbytes objects.

Any object carrying bnb's QuantState fields (absmax, shape, dtype, blocksize, quant_type, code, offset,
state2.{absmax, code, blocksize}) can be turned into a bnb QuantState here; the kernels package does
the opposite conversion on its own, so neither package imports the other.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch

from .formats import code_4bit
from .quant_state import is_nested


def quant_state_fields(quant_state) -> dict:
    """The fields a 4-bit dequantization needs, read from any quant-state-like object."""
    fields = {
        "absmax": quant_state.absmax,
        "shape": torch.Size(quant_state.shape),
        "dtype": quant_state.dtype,
        "blocksize": int(quant_state.blocksize),
        "quant_type": quant_state.quant_type,
        "code": getattr(quant_state, "code", None),
        "offset": None,
        "state2": None,
    }
    if is_nested(quant_state):
        s2 = quant_state.state2
        fields["offset"] = quant_state.offset
        fields["state2"] = {"absmax": s2.absmax, "code": s2.code, "blocksize": int(s2.blocksize)}
    return fields


def to_bnb_quant_state(quant_state, device: torch.device | str | None = None) -> F.QuantState:
    """A real bnb QuantState with the same fields (moved to `device` when given)."""
    f = quant_state_fields(quant_state)
    to = (lambda t: t.to(device)) if device is not None else (lambda t: t)
    code = f["code"] if f["code"] is not None else torch.from_numpy(code_4bit(f["quant_type"]).copy())
    state2 = None
    if f["state2"] is not None:
        s2 = f["state2"]
        state2 = F.QuantState(
            absmax=to(s2["absmax"]), code=to(s2["code"]), blocksize=s2["blocksize"], dtype=torch.float32
        )
    offset = f["offset"]
    if offset is not None and not isinstance(offset, torch.Tensor):
        offset = torch.tensor(offset, dtype=torch.float32)
    return F.QuantState(
        absmax=to(f["absmax"]),
        shape=f["shape"],
        code=to(code),
        dtype=f["dtype"],
        blocksize=f["blocksize"],
        quant_type=f["quant_type"],
        offset=to(offset) if offset is not None else None,
        state2=state2,
    )


def quantize_4bit(A: torch.Tensor, **kwargs) -> tuple[torch.Tensor, F.QuantState]:
    """bnb's own quantize_4bit, on whatever device A is on."""
    return F.quantize_4bit(A, **kwargs)


def dequantize_4bit(A: torch.Tensor, quant_state) -> torch.Tensor:
    """bnb's own dequantize_4bit for any quant-state-like object (CPU backend on CPU, CUDA on CUDA)."""
    if not isinstance(quant_state, F.QuantState):
        quant_state = to_bnb_quant_state(quant_state, A.device)
    return F.dequantize_4bit(A, quant_state)


def params4bit(
    weight: torch.Tensor,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    compress_statistics: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    device: torch.device | str = "cpu",
) -> bnb.nn.Params4bit:
    """A real bnb Params4bit holding `weight` quantized on `device` (CPU works through bnb's CPU backend)."""
    param = bnb.nn.Params4bit(
        weight.detach().cpu(),
        requires_grad=False,
        quant_type=quant_type,
        blocksize=blocksize,
        compress_statistics=compress_statistics,
        quant_storage=quant_storage,
    )
    return param.to(device)  # type: ignore[misc]  # bnb's overloads of .to confuse mypy


def linear4bit(
    in_features: int,
    out_features: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    bias: bool = False,
    quant_type: str = "nf4",
    blocksize: int = 64,
    compress_statistics: bool = True,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> bnb.nn.Linear4bit:
    """A real bnb Linear4bit with a fresh random (Kaiming-uniform-like) weight, quantized on `device`."""
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=dtype,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        quant_storage=torch.uint8,
    )
    bound = 1.0 / in_features**0.5
    weight = (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound
    layer.weight = params4bit(
        weight.to(dtype),
        quant_type=quant_type,
        blocksize=blocksize,
        compress_statistics=compress_statistics,
        device=device,
    )
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(out_features, generator=generator).to(dtype).to(device))
    return layer

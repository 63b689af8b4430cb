"""numpy oracle of bitsandbytes 4-bit dequantization (NF4/FP4, plain or nested absmax).

Follows the format facts in shared/DESIGN.md; each step is one float32 rounding, as in bnb:
    absmax[b] = fl(fl(code2[absmax_u8[b]] * absmax2[b // blocksize2]) + offset)     (nested only)
    w[i]      = to_dtype(fl(code4[nibble(i)] * absmax[i // blocksize]))           round to nearest even
where byte j of the packed tensor holds element 2j in its HIGH nibble and 2j+1 in its LOW nibble. Both products
are bnb CUDA's fast-math `mul.ftz.f32` (formats.mul_ftz): subnormal operands and products are zeros of the same
sign (only tiny absmax values, below ~1e-37, meet them); the nested sum is torch's, without the flush.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .formats import code_4bit, mul_ftz
from .quant_state import is_nested


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8 bytes -> the first n 4-bit codes, high nibble first."""
    nibbles = np.empty(packed.size * 2, dtype=np.uint8)
    nibbles[0::2] = packed >> 4
    nibbles[1::2] = packed & 0x0F
    return nibbles[:n]


def nested_absmax(absmax_u8, code2, absmax2, blocksize2: int, offset) -> np.ndarray:
    """The float32 absmax of a nested state: a product and a sum, each rounded to float32 on its own."""
    a8 = _np(absmax_u8).astype(np.int64)
    code2 = _np(code2).astype(np.float32, copy=False)
    absmax2 = _np(absmax2).astype(np.float32, copy=False)
    scale = absmax2[np.arange(a8.size) // blocksize2]
    product = mul_ftz(code2[a8], scale)  # bnb's dequantize_blockwise kernel: one rounding, fast-math flush
    return product + np.float32(_np(offset).reshape(()))  # torch's add: second rounding, no flush


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays a quiet NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(np.isnan(x), quiet_nan, rounded).astype(np.uint16)


def cast_float32(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Round float32 values once to `dtype` (nearest even) and return them as a CPU tensor."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == torch.float32:
        return torch.from_numpy(x.copy())
    if dtype == torch.float16:
        return torch.from_numpy(x.astype(np.float16))  # numpy rounds to nearest even
    if dtype == torch.bfloat16:
        return torch.from_numpy(float32_to_bfloat16_bits(x).view(np.int16)).view(torch.bfloat16)
    raise TypeError(f"output dtype must be float16, bfloat16 or float32, got {dtype}")


def absmax_float32(quant_state) -> np.ndarray:
    if is_nested(quant_state):
        s2 = quant_state.state2
        return nested_absmax(quant_state.absmax, s2.code, s2.absmax, s2.blocksize, quant_state.offset)
    return _np(quant_state.absmax).astype(np.float32, copy=False)


def dequantize_4bit_float32(A: torch.Tensor, quant_state) -> np.ndarray:
    """The float32 values bnb computes before its single rounding to the output dtype (flat)."""
    n = math.prod(quant_state.shape)
    packed = _np(A.detach().contiguous().view(torch.uint8)).reshape(-1)
    if packed.size * 2 < n:
        raise ValueError(f"A holds {packed.size * 2} 4-bit codes, the shape {tuple(quant_state.shape)} needs {n}")
    values = code_4bit(quant_state.quant_type)[unpack_nibbles(packed, n)]
    absmax = absmax_float32(quant_state)
    return mul_ftz(values, absmax[np.arange(n) // quant_state.blocksize])


def dequantize_4bit(A: torch.Tensor, quant_state) -> torch.Tensor:
    """Oracle for `bitsandbytes.functional.dequantize_4bit(A, quant_state)`; returns a CPU tensor."""
    flat = dequantize_4bit_float32(A, quant_state)
    return cast_float32(flat, quant_state.dtype).reshape(tuple(quant_state.shape))


def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)

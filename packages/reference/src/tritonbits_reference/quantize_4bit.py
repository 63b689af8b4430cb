"""numpy oracle of bitsandbytes 4-bit quantization with double quantization, as bnb does it on the CPU.

4-bit step (bnb's default backend): per block of `blocksize` values, absmax = max|x|; full blocks are
scaled by the float32 reciprocal of absmax, the tail block is divided by it; the scaled value is clipped
to [-1, 1] and bucketed by the midpoints of the sorted 4-bit code (a value on a midpoint goes to the
lower code); codes are packed two per byte, high nibble first, an odd count padded with the code of 0.

Nested step: offset = mean(absmax) (torch float32 reduction, as bnb); (absmax - offset) is quantized
blockwise (256) with the 8-bit dynamic code: each value divided by its block's absmax and mapped to the
nearest code entry, a tie going to the lower entry. bnb's CPU library searches a code whose entry 0 is
set to -1.0 (its binary search needs the range [-1, 1]); the state keeps the unmodified dynamic code.
"""

from __future__ import annotations

import numpy as np
import torch

from .formats import BLOCKSIZES_4BIT, NESTED_BLOCKSIZE, code_4bit, dynamic_code
from .quant_state import NestedState, ReferenceQuantState


def blockwise_absmax(x: np.ndarray, blocksize: int) -> np.ndarray:
    blocks = -(-x.size // blocksize)
    padded = np.zeros(blocks * blocksize, dtype=np.float32)
    padded[: x.size] = np.abs(x)
    return padded.reshape(blocks, blocksize).max(axis=1)


def quantize_4bit_codes(x: np.ndarray, blocksize: int, quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 values -> (4-bit codes padded to an even count, float32 absmax per block)."""
    absmax = blockwise_absmax(x, blocksize)
    safe = np.maximum(absmax, np.float32(1e-38))
    full = x.size - x.size % blocksize
    scaled = np.empty(x.size, dtype=np.float32)
    reciprocal = np.float32(1.0) / safe[: full // blocksize]
    scaled[:full] = (x[:full].reshape(-1, blocksize) * reciprocal[:, None]).reshape(-1)
    if full < x.size:
        scaled[full:] = x[full:] / safe[-1]
    scaled = np.clip(scaled, np.float32(-1.0), np.float32(1.0))
    if scaled.size % 2:
        scaled = np.append(scaled, np.float32(0.0))
    code = code_4bit(quant_type)
    order = np.argsort(code, kind="stable")
    bounds = (code[order[:-1]] + code[order[1:]]) / np.float32(2.0)
    return order[np.searchsorted(bounds, scaled, side="left")].astype(np.uint8), absmax


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)


def quantize_blockwise_dynamic(x: np.ndarray, blocksize: int, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bnb CPU 8-bit blockwise quantization: nearest entry of `code`, ties to the lower one."""
    absmax = blockwise_absmax(x, blocksize)
    with np.errstate(invalid="ignore"):
        normed = x / absmax[np.arange(x.size) // blocksize]
    # an all-zero block gives 0/0 = NaN, which bnb's binary search maps to entry 0
    normed = np.where(np.isnan(normed), code[0], normed)
    left = np.clip(np.searchsorted(code, normed, side="right") - 1, 0, code.size - 1)
    right = np.minimum(left + 1, code.size - 1)
    closer_right = np.abs(normed - code[right]) < np.abs(normed - code[left])
    return np.where(closer_right, right, left).astype(np.uint8), absmax


def quantize_4bit(
    A: torch.Tensor,
    *,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = True,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, ReferenceQuantState]:
    """Oracle for `bitsandbytes.functional.quantize_4bit` on the CPU; returns (packed [bytes, 1], state)."""
    if blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES_4BIT}, got {blocksize}")
    if A.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"A must be float16, bfloat16 or float32, got {A.dtype}")
    x = A.detach().reshape(-1).float().cpu().numpy()
    codes, absmax = quantize_4bit_codes(x, blocksize, quant_type)
    packed = torch.from_numpy(pack_nibbles(codes))
    if quant_storage != torch.uint8:
        packed = packed.view(quant_storage)
    packed = packed.unsqueeze(1)

    code = torch.from_numpy(code_4bit(quant_type).copy())
    state = ReferenceQuantState(
        absmax=torch.from_numpy(absmax),
        shape=A.shape,
        dtype=A.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=code,
    )
    if compress_statistics:
        offset = torch.from_numpy(absmax).mean()  # the same float32 reduction bnb uses
        code2 = dynamic_code()
        search_code = code2.copy()
        search_code[0] = np.float32(-1.0)
        q8, absmax2 = quantize_blockwise_dynamic(absmax - offset.numpy(), NESTED_BLOCKSIZE, search_code)
        state.absmax = torch.from_numpy(q8)
        state.offset = offset
        state.state2 = NestedState(
            absmax=torch.from_numpy(absmax2), code=torch.from_numpy(code2), blocksize=NESTED_BLOCKSIZE
        )
    return packed, state

"""The bitsandbytes 4-bit and 8-bit code tables, computed from their definitions (not copied from bnb).

Everything here is float32, the precision bnb stores its tables in.
"""

from __future__ import annotations

import numpy as np
import torch

# NormalFloat4: quantiles of N(0, 1) normalised to [-1, 1] (Dettmers et al., QLoRA, appendix E).
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip

# FP4 (e2m1 with bnb's own bias): magnitude codes for bits 0..7, then the negated copies for 8..15.
# bnb divides by the largest magnitude (12) in float32, so each entry is one correctly rounded quotient.
_FP4_MAGNITUDES = np.array([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], dtype=np.float32)
FP4_CODE = np.concatenate([_FP4_MAGNITUDES, -_FP4_MAGNITUDES]) / np.float32(12.0)

CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
QUANT_TYPES = tuple(CODES)
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bnb quantizes the 4-bit absmax with the 8-bit dynamic code in blocks of 256


def code_4bit(quant_type: str) -> np.ndarray:
    try:
        return CODES[quant_type]
    except KeyError:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}") from None


FLT_MIN = np.float32(2.0**-126)  # the smallest normal float32


def flush(x: np.ndarray) -> np.ndarray:
    """float32 subnormals to a zero of the same sign (NaN and Inf kept): what bnb's CUDA build (--use_fast_math,
    so every fp32 operation has .ftz) does to the operands and the result of each multiply."""
    x = np.asarray(x, dtype=np.float32)
    return np.where(np.abs(x) < FLT_MIN, x * np.float32(0.0), x).astype(np.float32)


def mul_ftz(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """bnb CUDA's fp32 `a * b` (`mul.ftz.f32`): subnormal operands flushed, and a product whose exact value is
    below 2**-126 in magnitude flushed to a zero of its sign (tininess before rounding: 2**-126 - 2**-150, which
    rounds to the normal 2**-126, is flushed; measured against bnb CUDA on an H100, the "boundary" case of
    tests/test_subnormals_cuda.py), else the product rounded to nearest even. The product of two fp32 values is
    exact in float64 (48 significant bits)."""
    with np.errstate(invalid="ignore", over="ignore"):
        exact = flush(a).astype(np.float64) * flush(b).astype(np.float64)
        return np.where(np.abs(exact) < FLT_MIN, exact * 0.0, exact).astype(np.float32)


def dynamic_code(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bnb's 8-bit "dynamic" code (Dettmers 2015): sign, a run of zero bits as the exponent, a linear fraction.

    Each exponent level e contributes the midpoints of a float32 linspace(0.1, 1) scaled by 10**(e-6);
    0 and 1 are appended, the list is padded with zeros to 256 entries and sorted.
    """
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    values: list[float] = []

    def level(exponent: int, items: int) -> None:
        # torch.linspace, as bnb uses: its float32 steps differ from numpy's float64 ones in the last bit
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + exponent)
        # float32 tensor times a Python number: float32 products, as in bnb
        values.extend((scale * means).tolist())
        if signed:
            values.extend((-scale * means).tolist())

    exponent = 0
    for exponent in range(max_exponent_bits):
        bits = exponent + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        level(exponent, 2**bits + 1)
    if additional_items > 0:
        level(exponent, additional_items + 1)
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:
        raise ValueError(f"dynamic code has {len(values)} entries, expected {2**total_bits}")
    values += [0.0] * (256 - len(values))
    return np.sort(np.array(values, dtype=np.float64)).astype(np.float32)

"""Subnormal inputs, products and outputs: the cases, and the bit-for-bit check, shared by the GPU tests that
compare the kernels (packages/kernels/tests/test_subnormals.py) and the oracle
(packages/reference/tests/test_subnormals_cuda.py) with bnb CUDA. Torch only.

bnb's CUDA library is built with --use_fast_math, so its fp32 multiplies are `mul.ftz.f32`: subnormal operands
and subnormal results are flushed to a zero of the same sign. The cases put that flush where it changes a byte
or an output's bits (a signed zero: the comparisons here are of bit patterns, so -0.0 differs from +0.0); each
case checks, as it is built, that it holds what it claims (`subnormal_cases` raises otherwise):
- "mixed": subnormal values (both signs) among normal ones. FP4: a negative subnormal scales to -0.0 in bnb (no
  sign bit, code 0b0000); unflushed it scales to a tiny negative (0b1000). 8-bit: the blocks with absmax below
  ~4e-32 (x / absmax above the dynamic code's first midpoint, 2.75e-7) change codes too.
- "tiny-absmax": blocks whose absmax is normal but tiny (1e-37 .. 2**-126) with subnormal members: bnb scales
  them to 0, unflushed they scale to up to ~1 (every format changes), and a block of subnormals only (absmax 0
  in bnb).
- "underflow": normal values whose product with 1 / absmax is subnormal (absmax 1e30 .. 2**126, members down to
  2**-60): FP4 sign bits of the negative ones. The mean of these absmax values (the nested offset) is finite.
- "huge-absmax": the same with absmax 2**127 and 3e38, whose fp32 reciprocal is subnormal itself (bnb's
  rcp.approx.ftz gives 0). Their mean overflows fp32: the nested path's offset is inf, which is no subnormal
  matter, so the tests label their nested comparisons on this case "inf offset" (`INF_OFFSET_CASES`).
- "boundary" (fp32): products at the edge of the normal range (exactly 2**-126 - 2**-150, which rounds to the
  normal 2**-126 in IEEE arithmetic): shows where the hardware's flush decides tininess.
- dequantize with tiny absmax (`TINY_ABSMAX`): code * absmax below 2**-126 is a signed 0 in bnb; bf16 and fp32
  outputs hold subnormals (`assert_subnormal_products` checks a state's products have both signs there).

fp16 holds no fp32 subnormal (its smallest value is 2**-24), so the inputs are bf16 and fp32 whatever the
session's dtype; the GPU tests run once, in a session that tests bf16 (`bf16_session_only`).
"""

from __future__ import annotations

import pytest
import torch

FLT_MIN = 2.0**-126
BLOCK = 64

CASE_NAMES = ("mixed", "tiny-absmax", "underflow", "huge-absmax", "boundary")
INF_OFFSET_CASES = frozenset({"huge-absmax"})  # mean(absmax) overflows fp32: the nested offset is inf
CASES = [(name, dtype) for dtype in (torch.bfloat16, torch.float32) for name in CASE_NAMES
         if name != "boundary" or dtype == torch.float32]  # fmt: skip
CASE_IDS = [f"{name}-{'bf16' if dtype == torch.bfloat16 else 'fp32'}" for name, dtype in CASES]

# 1.0 a control; 1e-39 is subnormal and -1e-37 negative, which no quantizer stores, but a state can hold
TINY_ABSMAX = [1.0, 3e-37, 1e-37, 5e-38, 2e-38, 1.5e-38, 1.2e-38, FLT_MIN, 1e-39, -1e-37]
OUT_DTYPES = [torch.bfloat16, torch.float32, torch.float16]
OUT_IDS = ["bf16", "fp32", "fp16"]


def subnormals(shape, dtype, gen) -> torch.Tensor:
    """Random subnormal values of `dtype` (bf16: 7 mantissa bits, fp32: 23), random signs, as exact fp32."""
    bits = 7 if dtype == torch.bfloat16 else 23
    m = torch.randint(1, 1 << bits, shape, generator=gen, dtype=torch.int64)
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return (m.double() * 2.0 ** (-126 - bits) * sign).float()


def in_dtype(x: torch.Tensor, dtype) -> torch.Tensor:
    """fp32 values rounded to `dtype` and back: exact in both."""
    return x.to(dtype).float()


def _is_subnormal(x: torch.Tensor) -> torch.Tensor:
    return (x != 0) & (x.abs() < FLT_MIN)


def _claim(ok, case: str, what: str) -> None:
    if not bool(ok):
        raise AssertionError(f"subnormal case {case!r} does not hold what it claims: {what}")


def _check_case(name: str, x: torch.Tensor) -> None:
    """Raise unless the fp32 values [blocks, 64] of case `name` hold what the module docstring says."""
    x64 = x.double()
    absmax = x64.abs().amax(1)
    sub = _is_subnormal(x64)
    product = x64 / absmax[:, None]  # x * (1 / absmax), exactly
    tiny_product = (x64 != 0) & (product.abs() < FLT_MIN)
    offset = x.abs().amax(1).where(x.abs().amax(1) >= FLT_MIN, 0.0).mean()  # fp32, as torch in bnb's nested path
    _claim(torch.isfinite(offset) != (name in INF_OFFSET_CASES), name, f"nested offset {offset.item()}")
    if name == "mixed":
        _claim((sub & (x64 < 0)).any() and (sub & (x64 > 0)).any(), name, "subnormals of both signs")
        _claim((absmax >= FLT_MIN).all(), name, "a normal absmax in every block")
        _claim((sub & (absmax[:, None] < 4e-32) & (product.abs() > 2.75e-7)).any(), name,
               "a subnormal above the 8-bit code's first midpoint of its block")  # fmt: skip
    elif name == "tiny-absmax":
        _claim(sub.any(1).all(), name, "subnormal members in every block")
        normal_tiny = (absmax >= FLT_MIN) & (absmax <= 4e-37)
        _claim(normal_tiny.sum() >= 2, name, "blocks with a normal absmax in [2**-126, 4e-37]")
        _claim((absmax < FLT_MIN).any(), name, "a block of subnormals only")
        _claim((normal_tiny | (absmax < FLT_MIN)).all(), name, "no block with a larger absmax")
    elif name in ("underflow", "huge-absmax"):
        normal_neg = (x64 < 0) & ~sub & tiny_product
        _claim(normal_neg.any(1).all(), name, "in every block a negative normal value with a subnormal product")
        _claim((absmax >= 1e30).all(), name, "absmax of at least 1e30 in every block")
        if name == "huge-absmax":
            _claim((1.0 / absmax.float() < FLT_MIN).all(), name, "an fp32 reciprocal below 2**-126 in every block")
    elif name == "boundary":
        _claim((tiny_product & (product.abs() > FLT_MIN * (1 - 2.0**-22))).any(), name,
               "products just below 2**-126")  # fmt: skip
        _claim(((x64 != 0) & (product.abs() >= FLT_MIN) & (product.abs() < 2 * FLT_MIN)).any(), name,
               "products just at or above 2**-126")  # fmt: skip
    else:
        raise AssertionError(f"unknown subnormal case {name!r}")


def subnormal_cases(dtype, gen) -> dict[str, torch.Tensor]:
    """name -> fp32 values [blocks, 64], exact in `dtype` (bf16 or fp32); blocks of 64 values. Each case is
    checked to hold what the module docstring says of it."""
    bits = 7 if dtype == torch.bfloat16 else 23
    extremes = torch.tensor([1.0, -1.0, 2.0**bits - 1, -(2.0**bits - 1)], dtype=torch.float64) * 2.0 ** (-126 - bits)
    cases = {}

    scales = torch.tensor([1.0, 1e-3, 1e-10, 1e-20, 1e-30, 1e-33, 1e-35, 1e-36]).repeat(2)
    x = in_dtype(torch.randn(scales.numel(), BLOCK, generator=gen) * scales[:, None], dtype)
    sub = torch.rand(x.shape, generator=gen) < 0.3
    x = torch.where(sub, subnormals(x.shape, dtype, gen), x)
    x[:, 0] = in_dtype(scales * 2.5, dtype)  # a normal absmax
    x[:, 1:5] = extremes.float()
    cases["mixed"] = x

    tiny = torch.tensor([3e-37, 1e-37, 5e-38, 2e-38, 1.5e-38, 1.2e-38, FLT_MIN, 0.0])
    x = subnormals((tiny.numel(), BLOCK), dtype, gen)
    a = in_dtype(tiny, dtype)
    x[:, 0], x[:, 1] = a, -a  # the last block has subnormals only (bnb: absmax 0)
    x[:, 2:8] = in_dtype(a[:, None] * (torch.rand(tiny.numel(), 6, generator=gen) * 2 - 1), dtype)
    x[:, 8:12] = extremes.float()
    x[:, 12] = 0.0
    cases["tiny-absmax"] = x

    huge = torch.tensor([1e30, 2.0**100, 2.0**120, 2.0**126, 2.0**127, 3e38])
    x = in_dtype(2.0 ** (torch.rand(huge.numel(), BLOCK, generator=gen) * -60), dtype)
    x = x * (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1)
    x[:, 0] = in_dtype(huge, dtype)
    x[:, 1:9] = torch.tensor([-1.0, 1.0, -(2.0**-30), -(2.0**-27), -1e-10, 1e-10, -1e-20, -(2.0**-40)])
    x[:, 1:9] = in_dtype(x[:, 1:9], dtype)
    x[:, 9:13] = extremes.float()
    cases["underflow"], cases["huge-absmax"] = x[:4].clone(), x[4:].clone()  # 2**127, 3e38: their mean is inf

    if dtype == torch.float32:
        e = 2.0**-26  # times 1 / 2**100: products around 2**-126
        near = torch.tensor([-(1 - 2.0**-24) * e, (1 - 2.0**-24) * e, -e, -(1 - 2.0**-23) * e, -(1 + 2.0**-23) * e,
                             -(1 - 2.0**-22) * e], dtype=torch.float64).float()  # fmt: skip
        x = torch.zeros(2, BLOCK)
        x[0, 0], x[1, 0] = 2.0**100, 2.0**101
        x[0, 1 : 1 + near.numel()] = near
        x[1, 1 : 1 + near.numel()] = near * 2
        cases["boundary"] = x
    for name, x in cases.items():
        _claim(torch.equal(x, in_dtype(x, dtype)), name, f"values exact in {dtype}")
        _check_case(name, x)
    return cases


def assert_subnormal_products(code: torch.Tensor, absmax: torch.Tensor) -> None:
    """Raise unless code * absmax (float64) has nonzero values below 2**-126 of both signs: a dequantize test
    over these whose flush could not give a signed zero would pass whatever the kernel's multiply does."""
    p = code.detach().cpu().double().reshape(-1, 1) * absmax.detach().cpu().double().reshape(1, -1)
    sub = _is_subnormal(p)
    if not ((sub & (p < 0)).any() and (sub & (p > 0)).any()):
        raise AssertionError("code * absmax has no subnormal products of both signs")


def bf16_session_only(test_dtypes: list[torch.dtype]) -> None:
    """Skip unless the session tests bf16: the cases' dtypes are their own (fp16 holds no fp32 subnormal), so a
    GPU profile's bf16 and fp16 sessions would run the same comparisons twice. Takes the plugin's `test_dtypes`."""
    if torch.bfloat16 not in test_dtypes:
        pytest.skip("subnormal cases run once, in a session that tests bf16 (--dtypes has no bf16)")


_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, limit: int = 5) -> None:
    """Equal bit for bit: floating tensors are compared as integers of their width, so -0.0 differs from +0.0
    (and a NaN from a NaN of another payload); the count of differing elements and the first ones when not."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.is_floating_point():
        ia, ie = a.view(_INT_OF_WIDTH[a.element_size()]), e.view(_INT_OF_WIDTH[e.element_size()])
    else:
        ia, ie = a, e
    differ = ia != ie
    if not differ.any():
        return
    hexw = 2 * a.element_size()
    mask = (1 << (8 * a.element_size())) - 1
    rows = []
    for i in differ.nonzero()[:limit]:
        at = tuple(i.tolist())
        rows.append(f"  at {at}: got {a[at].item()!r} (0x{int(ia[at]) & mask:0{hexw}x}), "
                    f"want {e[at].item()!r} (0x{int(ie[at]) & mask:0{hexw}x})")  # fmt: skip
    raise AssertionError(f"{int(differ.sum())} of {differ.numel()} elements differ in their bits; first:\n"
                         + "\n".join(rows))  # fmt: skip


def check(report: list[str], label: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """assert_bits_equal, collecting the failure (count of differing elements, first ones) instead of raising."""
    try:
        assert_bits_equal(got, want)
    except AssertionError as e:
        report.append(f"{label}: {e}")


def finish(report: list[str]) -> None:
    for line in report:
        print(line)
    assert not report, "\n".join(report)

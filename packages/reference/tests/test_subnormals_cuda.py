"""The numpy oracle of bnb CUDA against bnb CUDA itself on subnormal inputs, products and outputs (GPU sessions
only): the cases of packages/kernels/tests/test_subnormals.py (copied here: a test package does not import
another's tests). bnb's --use_fast_math build flushes subnormal operands and results of its fp32 multiplies
(`mul.ftz.f32`) to a zero of the same sign; these tests show whether the oracle models that."""

import pytest
import torch

import tritonbits_reference as R
from tritonbits_harness.tolerance import assert_exact
from tritonbits_reference.quantize_cuda import dequantize_blockwise_cuda, quantize_blockwise_cuda

FLT_MIN = 2.0**-126
BLOCK = 64


def subnormals(shape, dtype, gen) -> torch.Tensor:
    """Random subnormal values of `dtype` (bf16: 7 mantissa bits, fp32: 23), random signs, as exact fp32."""
    bits = 7 if dtype == torch.bfloat16 else 23
    m = torch.randint(1, 1 << bits, shape, generator=gen, dtype=torch.int64)
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return (m.double() * 2.0 ** (-126 - bits) * sign).float()


def in_dtype(x: torch.Tensor, dtype) -> torch.Tensor:
    """fp32 values rounded to `dtype` and back: exact in both."""
    return x.to(dtype).float()


def subnormal_cases(dtype, gen) -> dict[str, torch.Tensor]:
    """name -> fp32 values [blocks, 64], exact in `dtype` (bf16 or fp32); blocks of 64 values."""
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
    cases["underflow"] = x

    if dtype == torch.float32:
        e = 2.0**-26  # times 1 / 2**100: products around 2**-126
        near = torch.tensor([-(1 - 2.0**-24) * e, (1 - 2.0**-24) * e, -e, -(1 - 2.0**-23) * e, -(1 + 2.0**-23) * e,
                             -(1 - 2.0**-22) * e], dtype=torch.float64).float()  # fmt: skip
        x = torch.zeros(2, BLOCK)
        x[0, 0], x[1, 0] = 2.0**100, 2.0**101
        x[0, 1 : 1 + near.numel()] = near
        x[1, 1 : 1 + near.numel()] = near * 2
        cases["boundary"] = x
    return cases


CASES = [(name, dtype) for dtype in (torch.bfloat16, torch.float32)
         for name in ("mixed", "tiny-absmax", "underflow", "boundary")
         if name != "boundary" or dtype == torch.float32]  # fmt: skip
CASE_IDS = [f"{name}-{'bf16' if dtype == torch.bfloat16 else 'fp32'}" for name, dtype in CASES]


def check(report: list[str], label: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """assert_exact, collecting the failure (count of differing elements, first ones) instead of raising."""
    try:
        assert_exact(got.cpu(), want.cpu())
    except AssertionError as e:
        report.append(f"{label}: {e}")


def finish(report: list[str]) -> None:
    for line in report:
        print(line)
    assert not report, "\n".join(report)


@pytest.mark.gpu
@pytest.mark.parametrize(("case", "dtype"), CASES, ids=CASE_IDS)
def test_oracle_quantize_4bit_subnormals_equal_bnb_cuda(case, dtype, gen):
    import bitsandbytes.functional as F

    x = subnormal_cases(dtype, gen)[case].to(dtype)
    report: list[str] = []
    for quant_type in ("nf4", "fp4"):
        for nested in (False, True):
            packed, state = R.quantize_4bit_cuda(x, blocksize=BLOCK, quant_type=quant_type,
                                                 compress_statistics=nested)  # fmt: skip
            want_packed, want = F.quantize_4bit(x.cuda(), blocksize=BLOCK, quant_type=quant_type,
                                                compress_statistics=nested)  # fmt: skip
            label = f"{quant_type} {'nested' if nested else 'plain'}"
            check(report, f"{label} packed bytes", packed, want_packed)
            check(report, f"{label} absmax", state.absmax, want.absmax)
            if nested:
                check(report, f"{label} offset", state.offset.reshape(()), want.offset.reshape(()))
                check(report, f"{label} state2.absmax", state.state2.absmax, want.state2.absmax)
    finish(report)


@pytest.mark.gpu
@pytest.mark.parametrize(("case", "dtype"), CASES, ids=CASE_IDS)
def test_oracle_quantize_blockwise_subnormals_equal_bnb_cuda(case, dtype, gen):
    import bitsandbytes.functional as F

    x = subnormal_cases(dtype, gen)[case].to(dtype)
    report: list[str] = []
    q, state = quantize_blockwise_cuda(x, blocksize=BLOCK)
    want_q, want = F.quantize_blockwise(x.cuda(), blocksize=BLOCK)
    check(report, "codes", q, want_q)
    check(report, "absmax", state["absmax"], want.absmax)
    finish(report)


TINY_ABSMAX = [1.0, 3e-37, 1e-37, 5e-38, 2e-38, 1.5e-38, 1.2e-38, FLT_MIN, 1e-39, -1e-37]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_out", [torch.bfloat16, torch.float32, torch.float16], ids=["bf16", "fp32", "fp16"])
def test_oracle_dequantize_tiny_absmax_equals_bnb_cuda(dtype_out):
    """4-bit (plain and nested) and 8-bit dequantization where code * absmax is below 2**-126."""
    import bitsandbytes.functional as F

    report: list[str] = []
    absmax = torch.tensor(TINY_ABSMAX).repeat_interleave(8)  # 8 blocks of 32 bytes: all 256 byte values
    packed = torch.arange(256, dtype=torch.uint8).repeat(len(TINY_ABSMAX)).reshape(-1, 1)
    shape = torch.Size([packed.numel() * 2 // 256, 256])
    for quant_type in ("nf4", "fp4"):
        code = torch.from_numpy(R.NF4_CODE if quant_type == "nf4" else R.FP4_CODE)
        state = R.ReferenceQuantState(absmax=absmax, shape=shape, dtype=dtype_out, blocksize=BLOCK,
                                      quant_type=quant_type, code=code)  # fmt: skip
        bnb_state = F.QuantState(absmax=absmax.cuda(), shape=shape, code=code.cuda(), blocksize=BLOCK,
                                 quant_type=quant_type, dtype=dtype_out)  # fmt: skip
        check(
            report, f"{quant_type} plain", R.dequantize_4bit(packed, state), F.dequantize_4bit(packed.cuda(), bnb_state)
        )

        blocks = 256 * 3
        packed_n = torch.arange(256, dtype=torch.uint8).repeat(blocks // 8).reshape(-1, 1)
        shape_n = torch.Size([packed_n.numel() * 2 // 256, 256])
        absmax_u8 = torch.arange(256, dtype=torch.uint8).repeat(3)
        absmax2 = torch.tensor([1e-37, 2e-38, 1.0])
        dynamic = torch.from_numpy(R.dynamic_code())
        for offset in (0.0, 2e-38, -1e-38):
            nested = R.NestedState(absmax=absmax2, code=dynamic, blocksize=256)
            state = R.ReferenceQuantState(absmax=absmax_u8, shape=shape_n, dtype=dtype_out, blocksize=BLOCK,
                                          quant_type=quant_type, code=code, offset=torch.tensor(offset),
                                          state2=nested)  # fmt: skip
            state2 = F.QuantState(absmax=absmax2.cuda(), code=dynamic.cuda(), blocksize=256, dtype=torch.float32)
            bnb_state = F.QuantState(absmax=absmax_u8.cuda(), shape=shape_n, code=code.cuda(), blocksize=BLOCK,
                                     quant_type=quant_type, dtype=dtype_out, offset=torch.tensor(offset).cuda(),
                                     state2=state2)  # fmt: skip
            check(report, f"{quant_type} nested offset={offset}", R.dequantize_4bit(packed_n, state),
                  F.dequantize_4bit(packed_n.cuda(), bnb_state))  # fmt: skip

    absmax = torch.tensor(TINY_ABSMAX).repeat_interleave(4)  # 4 blocks of 64: all 256 codes
    q = torch.arange(256, dtype=torch.uint8).repeat(len(TINY_ABSMAX))
    dynamic = torch.from_numpy(R.dynamic_code())
    want = F.dequantize_blockwise(q.cuda(), F.QuantState(absmax=absmax.cuda(), code=dynamic.cuda(), blocksize=BLOCK,
                                                         dtype=dtype_out))  # fmt: skip
    check(report, "8-bit", dequantize_blockwise_cuda(q, absmax, dynamic, BLOCK, dtype_out), want)
    finish(report)

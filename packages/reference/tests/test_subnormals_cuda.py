"""The numpy oracle of bnb CUDA against bnb CUDA itself on subnormal inputs, products and outputs (GPU sessions
only): the cases of packages/kernels/tests/test_subnormals.py, from tritonbits_harness.subnormal_cases. bnb's
--use_fast_math build flushes subnormal operands and results of its fp32 multiplies (`mul.ftz.f32`) to a zero of
the same sign; these tests show whether the oracle models that. Comparisons are of bit patterns (-0.0 is not
+0.0); the tests run once, in a session that tests bf16."""

import numpy as np
import pytest
import torch

import tritonbits_reference as R
from tritonbits_harness import subnormal_cases as S
from tritonbits_reference.quantize_cuda import dequantize_blockwise_cuda, quantize_blockwise_cuda


@pytest.mark.gpu
@pytest.mark.parametrize(("case", "dtype"), S.CASES, ids=S.CASE_IDS)
def test_oracle_quantize_4bit_subnormals_equal_bnb_cuda(case, dtype, gen, test_dtypes, monkeypatch):
    import bitsandbytes.functional as F

    S.bf16_session_only(test_dtypes)

    x = S.subnormal_cases(dtype, gen)[case].to(dtype)
    report: list[str] = []
    for quant_type in ("nf4", "fp4"):
        for nested in (False, True):
            kw = {"blocksize": S.BLOCK, "quant_type": quant_type, "compress_statistics": nested}
            packed, state = R.quantize_4bit_cuda(x, **kw)
            want_packed, want = F.quantize_4bit(x.cuda(), **kw)
            label = f"{quant_type} {'nested' if nested else 'plain'}"
            if nested and case in S.INF_OFFSET_CASES:
                label += " (inf offset)"
            # a byte on a threshold (H200 204446Z, seed 1724851925: fp4 0x2a vs 0x3a, the ulp-up reciprocal's)
            packed = _explained_by_the_reciprocal(packed, want_packed.cpu(), monkeypatch,
                                                  lambda kw=kw: R.quantize_4bit_cuda(x, **kw)[0])  # fmt: skip
            S.check(report, f"{label} packed bytes", packed, want_packed)
            S.check(report, f"{label} absmax", state.absmax, want.absmax)
            if nested:
                S.check(report, f"{label} offset", state.offset.reshape(()), want.offset.reshape(()))
                S.check(report, f"{label} state2.absmax", state.state2.absmax, want.state2.absmax)
    S.finish(report)


@pytest.mark.gpu
@pytest.mark.parametrize(("case", "dtype"), S.CASES, ids=S.CASE_IDS)
def test_oracle_quantize_blockwise_subnormals_equal_bnb_cuda(case, dtype, gen, test_dtypes, monkeypatch):
    import bitsandbytes.functional as F

    S.bf16_session_only(test_dtypes)

    x = S.subnormal_cases(dtype, gen)[case].to(dtype)
    report: list[str] = []
    q, state = quantize_blockwise_cuda(x, blocksize=S.BLOCK)
    want_q, want = F.quantize_blockwise(x.cuda(), blocksize=S.BLOCK)
    # a code on a threshold (H100 200133Z, seed 1133792851: 47 vs 48, the ulp-down reciprocal's)
    q = _explained_by_the_reciprocal(q, want_q.cpu(), monkeypatch,
                                     lambda: quantize_blockwise_cuda(x, blocksize=S.BLOCK)[0])  # fmt: skip
    S.check(report, "codes", q, want_q)
    S.check(report, "absmax", state["absmax"], want.absmax)
    S.finish(report)


def _explained_by_the_reciprocal(got: torch.Tensor, want: torch.Tensor, monkeypatch, oracle) -> torch.Tensor:
    """`got` with its elements that differ from bnb's `want` replaced by bnb's where, and only where, the oracle
    run with every finite, non-zero block reciprocal one ulp down, or one ulp up, gives bnb's value. The oracle's
    reciprocal is correctly rounded; bnb's rcp.approx.ftz.f32 is within one ulp of it (docs/format.md), so a
    value scaled onto a threshold can take the neighbouring code (about one random "mixed" draw in 30). Any
    other difference is left for the caller's check to report."""
    from tritonbits_reference import quantize_cuda as Q

    differ = got != want
    if not differ.any():
        return got
    exact = Q._reciprocal
    explained = torch.zeros_like(differ)
    for toward in (np.float32(0.0), np.float32(np.inf)):

        def nudged(absmax, toward=toward):
            r = exact(absmax)
            return np.where(np.isfinite(r) & (r != 0), np.nextafter(r, toward), r).astype(np.float32)

        monkeypatch.setattr(Q, "_reciprocal", nudged)
        explained |= differ & (oracle().reshape(got.shape) == want)
    monkeypatch.setattr(Q, "_reciprocal", exact)
    if explained.any():
        print(f"{int(explained.sum())} element(s) differ by the reciprocal's last bit: {got[explained].tolist()} vs "
              f"{want[explained].tolist()}")  # fmt: skip
    return torch.where(explained, want, got)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_out", S.OUT_DTYPES, ids=S.OUT_IDS)
def test_oracle_dequantize_tiny_absmax_equals_bnb_cuda(dtype_out, test_dtypes):
    """4-bit (plain and nested) and 8-bit dequantization where code * absmax is below 2**-126."""
    import bitsandbytes.functional as F

    S.bf16_session_only(test_dtypes)

    report: list[str] = []
    absmax = torch.tensor(S.TINY_ABSMAX).repeat_interleave(8)  # 8 blocks of 32 bytes: all 256 byte values
    packed = torch.arange(256, dtype=torch.uint8).repeat(len(S.TINY_ABSMAX)).reshape(-1, 1)
    shape = torch.Size([packed.numel() * 2 // 256, 256])
    for quant_type in ("nf4", "fp4"):
        code = torch.from_numpy(R.NF4_CODE if quant_type == "nf4" else R.FP4_CODE)
        S.assert_subnormal_products(code, absmax)
        state = R.ReferenceQuantState(absmax=absmax, shape=shape, dtype=dtype_out, blocksize=S.BLOCK,
                                      quant_type=quant_type, code=code)  # fmt: skip
        bnb_state = F.QuantState(absmax=absmax.cuda(), shape=shape, code=code.cuda(), blocksize=S.BLOCK,
                                 quant_type=quant_type, dtype=dtype_out)  # fmt: skip
        S.check(
            report, f"{quant_type} plain", R.dequantize_4bit(packed, state), F.dequantize_4bit(packed.cuda(), bnb_state)
        )

        blocks = 256 * 3
        packed_n = torch.arange(256, dtype=torch.uint8).repeat(blocks // 8).reshape(-1, 1)
        shape_n = torch.Size([packed_n.numel() * 2 // 256, 256])
        absmax_u8 = torch.arange(256, dtype=torch.uint8).repeat(3)
        absmax2 = torch.tensor([1e-37, 2e-38, 1.0])
        dynamic = torch.from_numpy(R.dynamic_code())
        S.assert_subnormal_products(dynamic, absmax2)
        for offset in (0.0, 2e-38, -1e-38):
            nested = R.NestedState(absmax=absmax2, code=dynamic, blocksize=256)
            state = R.ReferenceQuantState(absmax=absmax_u8, shape=shape_n, dtype=dtype_out, blocksize=S.BLOCK,
                                          quant_type=quant_type, code=code, offset=torch.tensor(offset),
                                          state2=nested)  # fmt: skip
            state2 = F.QuantState(absmax=absmax2.cuda(), code=dynamic.cuda(), blocksize=256, dtype=torch.float32)
            bnb_state = F.QuantState(absmax=absmax_u8.cuda(), shape=shape_n, code=code.cuda(), blocksize=S.BLOCK,
                                     quant_type=quant_type, dtype=dtype_out, offset=torch.tensor(offset).cuda(),
                                     state2=state2)  # fmt: skip
            S.check(report, f"{quant_type} nested offset={offset}", R.dequantize_4bit(packed_n, state),
                  F.dequantize_4bit(packed_n.cuda(), bnb_state))  # fmt: skip

    absmax = torch.tensor(S.TINY_ABSMAX).repeat_interleave(4)  # 4 blocks of 64: all 256 codes
    q = torch.arange(256, dtype=torch.uint8).repeat(len(S.TINY_ABSMAX))
    dynamic = torch.from_numpy(R.dynamic_code())
    S.assert_subnormal_products(dynamic, absmax)
    want = F.dequantize_blockwise(q.cuda(), F.QuantState(absmax=absmax.cuda(), code=dynamic.cuda(), blocksize=S.BLOCK,
                                                         dtype=dtype_out))  # fmt: skip
    S.check(report, "8-bit", dequantize_blockwise_cuda(q, absmax, dynamic, S.BLOCK, dtype_out), want)
    S.finish(report)

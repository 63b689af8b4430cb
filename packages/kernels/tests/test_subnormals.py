"""Subnormal inputs, products and outputs against bitsandbytes CUDA (GPU sessions only), and the interpreter
against the oracle on the same cases (CPU runs).

bnb's CUDA library is built with --use_fast_math, so its fp32 multiplies are `mul.ftz.f32`: subnormal operands
and subnormal results are flushed to a zero of the same sign. The cases (tritonbits_harness.subnormal_cases,
shared with packages/reference/tests/test_subnormals_cuda.py; its docstring says what each holds) put that flush
where it changes a byte or an output's sign of zero, if the kernel's multiply does not flush.

Every comparison is of bit patterns (`subnormal_cases.assert_bits_equal`: -0.0 is not +0.0); a test runs all of
its comparisons and reports each mismatch with the count of differing elements and the first few, so one GPU
session shows the whole picture. The GPU tests run once, in a session that tests bf16 (`bf16_session_only`).
"""

import pytest
import torch

import tritonbits
import tritonbits.quant_state
from tritonbits import formats
from tritonbits.ops import blockwise_8bit as b8
from tritonbits.ops import quantize_4bit as q4
from tritonbits_harness.subnormal_cases import (
    BLOCK,
    CASE_IDS,
    CASES,
    INF_OFFSET_CASES,
    OUT_DTYPES,
    OUT_IDS,
    TINY_ABSMAX,
    assert_subnormal_products,
    bf16_session_only,
    check,
    finish,
    subnormal_cases,
)


@pytest.mark.gpu
@pytest.mark.parametrize(("case", "dtype"), CASES, ids=CASE_IDS)
def test_quantize_4bit_subnormals_match_bnb(case, dtype, device, gen, test_dtypes):
    import bitsandbytes.functional as F

    bf16_session_only(test_dtypes)

    x = subnormal_cases(dtype, gen)[case].to(dtype).to(device)
    report: list[str] = []
    for quant_type in ("nf4", "fp4"):
        want_packed, want = F.quantize_4bit(x, blocksize=BLOCK, quant_type=quant_type)
        for pairs in (True, False):
            packed = torch.empty(x.numel() // 2, dtype=torch.uint8, device=device)
            absmax = torch.empty(x.numel() // BLOCK, device=device)
            q4.launch(x.view(-1), packed, absmax, BLOCK, quant_type, pairs=pairs)
            check(report, f"{quant_type} pairs={pairs} packed bytes", packed, want_packed.view(-1))
            check(report, f"{quant_type} pairs={pairs} absmax", absmax, want.absmax)
        packed, state = tritonbits.quantize_4bit(x, blocksize=BLOCK, quant_type=quant_type, compress_statistics=True)
        want_packed, want = F.quantize_4bit(x, blocksize=BLOCK, quant_type=quant_type, compress_statistics=True)
        nested = f"{quant_type} nested{' (inf offset)' if case in INF_OFFSET_CASES else ''}"
        check(report, f"{nested} packed bytes", packed, want_packed)
        check(report, f"{nested} absmax codes", state.absmax, want.absmax)
        check(report, f"{nested} offset", state.offset.reshape(()), want.offset.reshape(()))
        check(report, f"{nested} state2.absmax", state.state2.absmax, want.state2.absmax)
    finish(report)


@pytest.mark.gpu
@pytest.mark.parametrize(("case", "dtype"), CASES, ids=CASE_IDS)
def test_quantize_blockwise_subnormals_match_bnb(case, dtype, device, gen, test_dtypes):
    import bitsandbytes.functional as F

    bf16_session_only(test_dtypes)

    x = subnormal_cases(dtype, gen)[case].to(dtype).to(device)
    report: list[str] = []
    want_q, want = F.quantize_blockwise(x, blocksize=BLOCK)
    code = formats.code_table("dynamic", device)
    for encoder in b8.ENCODERS:
        q = torch.empty(x.numel(), dtype=torch.uint8, device=device)
        absmax = torch.empty(x.numel() // BLOCK, device=device)
        b8.launch_quantize(x.view(-1), code, q, absmax, BLOCK, encoder=encoder)
        check(report, f"{encoder} codes", q, want_q.view(-1))
        check(report, f"{encoder} absmax", absmax, want.absmax)
    q, state = tritonbits.quantize_blockwise(x, blocksize=BLOCK)
    check(report, "quantize_blockwise codes", q, want_q)
    check(report, "quantize_blockwise absmax", state.absmax, want.absmax)
    check(report, "dequantize_blockwise of bnb's state", tritonbits.dequantize_blockwise(want_q, want),
          F.dequantize_blockwise(want_q, want))  # fmt: skip
    finish(report)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_out", OUT_DTYPES, ids=OUT_IDS)
def test_dequantize_4bit_tiny_absmax_matches_bnb(dtype_out, device, test_dtypes):
    """Every packed byte value under each absmax (1.0 a control; 1e-39 is subnormal and -1e-37 negative, which
    no quantizer stores, but a state can hold): code * absmax below 2**-126 is a signed 0 in bnb."""
    import bitsandbytes.functional as F

    bf16_session_only(test_dtypes)

    report: list[str] = []
    absmax = torch.tensor(TINY_ABSMAX).repeat_interleave(8).to(device)  # 8 blocks of 32 bytes: all 256 bytes
    packed = torch.arange(256, dtype=torch.uint8).repeat(len(TINY_ABSMAX)).reshape(-1, 1).to(device)
    n = packed.numel() * 2
    shape = torch.Size([n // 256, 256])
    for quant_type in ("nf4", "fp4"):
        state = F.QuantState(absmax=absmax, shape=shape, code=F.get_4bit_type(quant_type, device=device),
                             blocksize=BLOCK, quant_type=quant_type, dtype=dtype_out)  # fmt: skip
        assert_subnormal_products(state.code, absmax)
        check(report, f"{quant_type}", tritonbits.dequantize_4bit(packed, state), F.dequantize_4bit(packed, state))
    finish(report)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_out", OUT_DTYPES, ids=OUT_IDS)
def test_dequantize_4bit_nested_tiny_absmax_matches_bnb(dtype_out, device, test_dtypes):
    """Nested absmax code2 * absmax2 below 2**-126 (bnb's dequantize_blockwise flushes it, then adds the offset
    in torch), then the 4-bit product."""
    import bitsandbytes.functional as F

    bf16_session_only(test_dtypes)

    report: list[str] = []
    blocks = 256 * 3
    packed = torch.arange(256, dtype=torch.uint8).repeat(blocks // 8).reshape(-1, 1).to(device)
    n = packed.numel() * 2
    shape = torch.Size([n // 256, 256])
    absmax_u8 = torch.arange(256, dtype=torch.uint8).repeat(3).to(device)
    absmax2 = torch.tensor([1e-37, 2e-38, 1.0]).to(device)
    for offset in (0.0, 2e-38, -1e-38):
        for quant_type in ("nf4", "fp4"):
            state2 = F.QuantState(absmax=absmax2, code=F.create_dynamic_map().to(device), blocksize=256,
                                  dtype=torch.float32)  # fmt: skip
            assert_subnormal_products(state2.code, absmax2)
            state = F.QuantState(absmax=absmax_u8, shape=shape, blocksize=BLOCK, quant_type=quant_type,
                                 code=F.get_4bit_type(quant_type, device=device), dtype=dtype_out,
                                 offset=torch.tensor(offset, device=device), state2=state2)  # fmt: skip
            got = tritonbits.dequantize_4bit(packed, state)
            check(report, f"{quant_type} offset={offset}", got, F.dequantize_4bit(packed, state))
    finish(report)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_out", OUT_DTYPES, ids=OUT_IDS)
def test_dequantize_blockwise_tiny_absmax_matches_bnb(dtype_out, device, test_dtypes):
    import bitsandbytes.functional as F

    bf16_session_only(test_dtypes)

    report: list[str] = []
    absmax = torch.tensor(TINY_ABSMAX).repeat_interleave(4).to(device)  # 4 blocks of 64: all 256 codes
    q = torch.arange(256, dtype=torch.uint8).repeat(len(TINY_ABSMAX)).to(device)
    code = F.create_dynamic_map().to(device)
    state = F.QuantState(absmax=absmax, code=code, blocksize=BLOCK, dtype=dtype_out)
    assert_subnormal_products(code, absmax)
    check(report, "dequantize_blockwise", tritonbits.dequantize_blockwise(q, state), F.dequantize_blockwise(q, state))
    finish(report)


# --- interpreter (CPU runs): the kernels' emulated flush equals the oracle's model of bnb's -------------------

SWEEP_ABSMAX = [1.0, 2.0**-100, 1e-30, 1e-35, 3e-37, 1e-37, 2e-38, 1.2e-38, 2.0**100, 2.0**126, 2.0**127]


def bf16_subnormal_sweep() -> torch.Tensor:
    """Every bf16 subnormal pattern of both signs (2 * 127) with -0.0, +-2**-126 and a few normals, in blocks of
    64 whose first value sets the absmax (each value of SWEEP_ABSMAX, rounded to bf16; 2**127 makes the fp32
    reciprocal subnormal, which bnb's rcp.approx.ftz flushes to 0), as fp32 values exact in bf16."""
    mags = torch.arange(1, 128, dtype=torch.float64) * 2.0**-133
    normals = torch.tensor([2.0**-126, 2.0**-120, 1e-38, 2.0**-60, 2.0**-30, 1e-10, 0.25, 1.0], dtype=torch.float64)
    body = torch.cat([mags, -mags, normals, -normals, torch.tensor([-0.0, 0.0], dtype=torch.float64)]).float()
    per_block = BLOCK - 1
    pad = -body.numel() % per_block
    body = torch.cat([body, torch.zeros(pad)]).reshape(-1, per_block)
    blocks = []
    for a in SWEEP_ABSMAX:
        head = torch.full((body.shape[0], 1), a).to(torch.bfloat16).float()
        # a value above the absmax would change it: keep those of each block at most the absmax
        blocks.append(torch.cat([head, torch.where(body.abs() <= head, body, body * 0.0)], dim=1))
    return torch.cat(blocks)


def test_interpreter_equals_oracle_on_subnormals(device, gen):
    """quantize_4bit (nf4, fp4; both reads; nested), quantize_blockwise (both encoders) and the dequantizers on the
    sweep and on the GPU tests' cases equal the oracle bit for bit (under the interpreter; on a GPU the tests
    above compare with bnb itself)."""
    if device.type == "cuda":
        pytest.skip("CPU runs: on a GPU the kernels are compared with bnb CUDA above")
    import tritonbits_reference as R

    inputs = {("sweep", torch.bfloat16): bf16_subnormal_sweep(), ("sweep", torch.float32): bf16_subnormal_sweep()}
    for dtype in (torch.bfloat16, torch.float32):
        for name, x in subnormal_cases(dtype, gen).items():
            inputs[name, dtype] = x
    report: list[str] = []
    code = formats.code_table("dynamic", device)
    for (name, dtype), x32 in inputs.items():
        x = x32.to(dtype).to(device)
        label = f"{name} {dtype}"
        for quant_type in ("nf4", "fp4"):
            want_packed, want = R.quantize_4bit_cuda(x, blocksize=BLOCK, quant_type=quant_type)
            for pairs in (True, False):
                packed = torch.empty(x.numel() // 2, dtype=torch.uint8, device=device)
                absmax = torch.empty(x.numel() // BLOCK, device=device)
                q4.launch(x.view(-1), packed, absmax, BLOCK, quant_type, pairs=pairs)
                check(report, f"{label} {quant_type} pairs={pairs} bytes", packed, want_packed.view(-1))
                check(report, f"{label} {quant_type} pairs={pairs} absmax", absmax, want.absmax)
            packed, state = tritonbits.quantize_4bit(
                x, blocksize=BLOCK, quant_type=quant_type, compress_statistics=True
            )
            want_packed, want = R.quantize_4bit_cuda(
                x, blocksize=BLOCK, quant_type=quant_type, compress_statistics=True
            )
            nested = f"{label} {quant_type} nested{' (inf offset)' if name in INF_OFFSET_CASES else ''}"
            check(report, f"{nested} bytes", packed, want_packed)
            check(report, f"{nested} absmax", state.absmax, want.absmax)
            check(report, f"{nested} offset", state.offset.reshape(()), want.offset.reshape(()))
            check(report, f"{nested} state2.absmax", state.state2.absmax, want.state2.absmax)
        want_q, want8 = R.quantize_blockwise_cuda(x, blocksize=BLOCK)
        for encoder in b8.ENCODERS:
            q = torch.empty(x.numel(), dtype=torch.uint8, device=device)
            absmax = torch.empty(x.numel() // BLOCK, device=device)
            b8.launch_quantize(x.view(-1), code, q, absmax, BLOCK, encoder=encoder)
            check(report, f"{label} 8-bit {encoder} codes", q, want_q.view(-1))
            check(report, f"{label} 8-bit {encoder} absmax", absmax, want8["absmax"])
    finish(report)


@pytest.mark.parametrize("dtype_out", OUT_DTYPES, ids=OUT_IDS)
def test_interpreter_dequantize_equals_oracle_on_tiny_absmax(dtype_out, device):
    """Every packed byte / 8-bit code under tiny (and subnormal, and negative) absmax values, plain and nested:
    the kernels equal the oracle where code * absmax is below 2**-126 (interpreter; GPU: the bnb tests above)."""
    if device.type == "cuda":
        pytest.skip("CPU runs: on a GPU the kernels are compared with bnb CUDA above")
    import tritonbits_reference as R
    from tritonbits.quant_state import NestedState

    report: list[str] = []
    dynamic = torch.from_numpy(R.dynamic_code())
    absmax = torch.tensor(TINY_ABSMAX).repeat_interleave(8)  # 8 blocks of 32 bytes: all 256 byte values
    packed = torch.arange(256, dtype=torch.uint8).repeat(len(TINY_ABSMAX)).reshape(-1, 1)
    shape = torch.Size([packed.numel() * 2 // 256, 256])
    packed_n = torch.arange(256, dtype=torch.uint8).repeat(256 * 3 // 8).reshape(-1, 1)
    shape_n = torch.Size([packed_n.numel() * 2 // 256, 256])
    absmax_u8 = torch.arange(256, dtype=torch.uint8).repeat(3)
    for quant_type in ("nf4", "fp4"):
        code4 = torch.from_numpy(R.NF4_CODE if quant_type == "nf4" else R.FP4_CODE)
        state = tritonbits.QuantState(absmax=absmax, shape=shape, dtype=dtype_out, blocksize=BLOCK,
                                      quant_type=quant_type, code=code4)  # fmt: skip
        check(
            report, f"{quant_type} plain", tritonbits.dequantize_4bit(packed, state), R.dequantize_4bit(packed, state)
        )
        for offset in (0.0, 2e-38, -1e-38):
            state2 = NestedState(absmax=torch.tensor([1e-37, 2e-38, 1.0]), code=dynamic, blocksize=256)
            state = tritonbits.QuantState(absmax=absmax_u8, shape=shape_n, dtype=dtype_out, blocksize=BLOCK,
                                          quant_type=quant_type, code=code4, offset=torch.tensor(offset),
                                          state2=state2)  # fmt: skip
            got = tritonbits.dequantize_4bit(packed_n, state)
            check(report, f"{quant_type} nested offset={offset}", got, R.dequantize_4bit(packed_n, state))
    absmax8 = torch.tensor(TINY_ABSMAX).repeat_interleave(4)  # 4 blocks of 64: all 256 codes
    q = torch.arange(256, dtype=torch.uint8).repeat(len(TINY_ABSMAX))
    state = tritonbits.QuantState(absmax=absmax8, shape=q.shape, dtype=dtype_out, blocksize=BLOCK,
                                  quant_type=None, code=dynamic)  # type: ignore[arg-type]  # fmt: skip
    check(report, "8-bit", tritonbits.dequantize_blockwise(q, state),
          R.dequantize_blockwise_cuda(q, absmax8, dynamic, BLOCK, dtype_out))  # fmt: skip
    finish(report)


# --- linear_4bit: the fused paths multiply dequantize_4bit's weights, flushed products included ---------------

LINEAR_PATHS = {
    "gemv": {"path": "gemv", "bm": 16, "bn": 16, "bk": 128, "split_k": 2, "pair": True},
    "gemv2": {"path": "gemv2", "bm": 16, "bn": 16, "bk": 128, "warps": 4, "rows": 32},
    "gemm": {"path": "gemm", "bm": 32, "bn": 32, "bk": 64, "split_k": 1, "pair": False},
    "dequant": {"path": "dequant"},
}


def _tiny_states(device, dtype):
    """(label, packed, state): every byte value under each TINY_ABSMAX value (plain, nf4 and fp4), and nf4
    under a nested absmax whose code2 * absmax2 products are subnormal with a small normal offset (flushed
    or not, the sum differs); weights [N, 256]."""
    absmax = torch.tensor(TINY_ABSMAX).repeat_interleave(8).to(device)
    packed = torch.arange(256, dtype=torch.uint8).repeat(len(TINY_ABSMAX)).reshape(-1, 1).to(device)
    for quant_type in ("nf4", "fp4"):
        code4 = formats.code_table(quant_type, device)
        assert_subnormal_products(code4, absmax)
        state = tritonbits.QuantState(absmax=absmax, shape=torch.Size([packed.numel() // 128, 256]), dtype=dtype,
                                      blocksize=BLOCK, quant_type=quant_type, code=code4)  # fmt: skip
        yield f"{quant_type} plain", packed, state
    dynamic = formats.code_table("dynamic", device)
    absmax2 = torch.tensor([2e-38], device=device)
    assert_subnormal_products(dynamic, absmax2)
    packed_n = torch.arange(256, dtype=torch.uint8).repeat(256 // 8).reshape(-1, 1).to(device)
    state2 = tritonbits.quant_state.NestedState(absmax=absmax2, code=dynamic, blocksize=256)
    state = tritonbits.QuantState(absmax=torch.arange(256, dtype=torch.uint8).to(device), dtype=dtype,
                                  shape=torch.Size([packed_n.numel() // 128, 256]), blocksize=BLOCK, quant_type="nf4",
                                  code=formats.code_table("nf4", device), offset=torch.tensor(2e-38, device=device),
                                  state2=state2)  # fmt: skip
    yield "nf4 nested offset=2e-38", packed_n, state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_linear_4bit_weights_flush_as_dequantize_4bit(dtype, device, test_dtypes):
    """x = 2**100 * I: each output is one weight times 2**100, exactly, so every path's weights are compared
    with dequantize_4bit's (itself compared with bnb above, and with the oracle under the interpreter). A product
    code * absmax below 2**-126 that a path does not flush is a subnormal weight there (about 2**-130: an output
    near 2**-30) where dequantize_4bit's is a signed zero. fp16 holds no such weight: left out."""
    from tritonbits.ops import linear_4bit as L
    from tritonbits_harness.tolerance import assert_exact

    if device.type == "cuda":
        bf16_session_only(test_dtypes)
    x = (torch.eye(256) * 2.0**100).to(dtype).to(device)
    report: list[str] = []
    for label, packed, state in _tiny_states(device, dtype):
        want = tritonbits.dequantize_4bit(packed, state).reshape(tuple(state.shape)).T * 2.0**100
        if "plain" in label:  # the case can fail: unflushed products would give nonzero outputs where want is 0
            code = state.code.double()[torch.arange(16, device=device)]
            assert ((code[:, None] * state.absmax.double()[None, :]).abs() < 2.0**-126).any()
            assert (want == 0).any()
        prepared = L._prepare(packed, state)
        for path, cfg in LINEAR_PATHS.items():
            got = L.forward_2d(x, prepared, None, config=cfg)
            try:
                assert_exact(got, want)
            except AssertionError as e:
                report.append(f"{label} {path}: {e}")
    finish(report)

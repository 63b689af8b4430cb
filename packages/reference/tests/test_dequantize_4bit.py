"""The numpy oracle equals bitsandbytes' own CPU dequantization, bit for bit."""

import itertools
import math

import bitsandbytes.functional as F
import pytest
import torch
from bitsandbytes.backends.default import ops as bnb_default

import tritonbits_reference as R
from tritonbits_reference.dequantize_4bit import float32_to_bfloat16_bits

SHAPES = [(64,), (5,), (33, 7), (130, 64), (3, 1025), (2, 4096), (17, 384)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bnb_cpu_dequantize(q, state):
    """bnb's CPU answer. Its native CPU kernel blocks each row on its own when the row length is not a
    multiple of the blocksize (a bnb CPU quirk; CUDA and bnb's default backend block the flat tensor,
    which is the format), so for those shapes the flat default backend is bnb's answer."""
    if state.shape[-1] % state.blocksize == 0 or state.shape[-1] % 2:
        return F.dequantize_4bit(q, state).reshape(state.shape)  # bnb CPU returns [1, n] for 1-D shapes
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    code = F.get_4bit_type(state.quant_type, device="cpu")
    return bnb_default._dequantize_4bit_compute(
        q.reshape(-1).view(torch.uint8), absmax, code, state.blocksize, state.shape, state.dtype
    )


def bnb_cuda_dequantize(q, state):
    """bnb's CUDA answer for a CPU-quantized state: the contract the kernels are held to."""
    from tritonbits_reference.bnb import to_bnb_quant_state

    return F.dequantize_4bit(q.cuda(), to_bnb_quant_state(state, "cuda")).cpu()


CASES = list(itertools.product(SHAPES, R.BLOCKSIZES_4BIT, R.QUANT_TYPES, (False, True), DTYPES))


@pytest.mark.parametrize(("shape", "blocksize", "quant_type", "nested", "dtype"), CASES)
def test_oracle_equals_bnb(shape, blocksize, quant_type, nested, dtype, gen, on_gpu):
    """On CPU runs against bnb's CPU backend; in GPU sessions against bnb's CUDA kernels. (On one GPU
    machine's CPU, bnb's native CPU kernel differed from both in 1 of 576 cases; it is not the contract.)"""
    w = (torch.randn(shape, generator=gen) * 3).to(dtype)
    q, state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    got = R.dequantize_4bit(q, state)
    want = bnb_cuda_dequantize(q, state) if on_gpu else bnb_cpu_dequantize(q, state)
    assert got.dtype == dtype and got.shape == torch.Size(shape)
    assert torch.equal(got, want), f"first mismatch at {(got != want).nonzero()[:5].tolist()}"


@pytest.mark.parametrize("quant_storage", [torch.float16, torch.bfloat16, torch.float32])
def test_other_quant_storage_is_read_as_bytes(quant_storage, gen):
    w = torch.randn(96, 64, generator=gen)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=quant_storage)
    assert q.dtype == quant_storage
    assert torch.equal(R.dequantize_4bit(q, state), F.dequantize_4bit(q, state))


def test_nested_absmax_rounds_product_and_sum_separately(gen):
    """An FMA would round once; bnb (and so the oracle) rounds the product, then the sum."""
    w = torch.randn(64 * 512, generator=gen)
    _, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True)
    two = R.dequantize_4bit.__globals__["absmax_float32"](state)
    code2 = state.state2.code.double()[state.absmax.long()]
    scale = state.state2.absmax.double().repeat_interleave(256)[: state.absmax.numel()]
    fused = (code2 * scale + state.offset.double()).float().numpy()  # one rounding of the exact value
    bnb_way = (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).numpy()
    assert (two == bnb_way).all()
    assert (fused != bnb_way).any(), "expected at least one block where one rounding differs from two"


def test_bfloat16_rounding_is_nearest_even():
    x = torch.randn(1 << 16, dtype=torch.float32) * 1e3
    bits = float32_to_bfloat16_bits(x.numpy())
    assert torch.equal(torch.from_numpy(bits.view("int16")).view(torch.bfloat16), x.to(torch.bfloat16))


def test_short_packed_tensor_is_refused(gen):
    w = torch.randn(128, generator=gen)
    q, state = F.quantize_4bit(w, blocksize=64)
    state.shape = torch.Size([130])
    with pytest.raises(ValueError, match="needs 130"):
        R.dequantize_4bit(q, state)


def test_sweep_covers_tail_blocks():
    assert any(math.prod(s) % b for s in SHAPES for b in R.BLOCKSIZES_4BIT)
    assert any(math.prod(s) % 2 for s in SHAPES)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(128, 256), (33, 7)])
def test_torch_baseline_equals_oracle(shape, nested, gen):
    """The pure-PyTorch baseline the benchmarks compile computes the same function (eager: two roundings)."""
    from tritonbits_reference import baselines

    w = torch.randn(shape, generator=gen).to(torch.bfloat16)
    q, state = R.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    got = baselines.torch_dequantize_4bit(**baselines.torch_fields(q, state, "cpu"))
    assert torch.equal(got, R.dequantize_4bit(q, state))

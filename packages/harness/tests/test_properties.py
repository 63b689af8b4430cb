"""Property-based checks across the packages (hypothesis): kernels against the oracles on inputs drawn
from the whole space the formats allow, not only the sweeps' hand-picked shapes."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tritonbits
import tritonbits_reference as R
from tritonbits_harness.pytest_plugin import examples
from tritonbits_harness.tolerance import assert_dequant_bias, assert_exact
from tritonbits_reference.bnb import to_bnb_quant_state

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@given(
    n=st.integers(min_value=1, max_value=3000),
    blocksize=st.sampled_from(R.BLOCKSIZES_4BIT),
    quant_type=st.sampled_from(R.QUANT_TYPES),
    nested=st.booleans(),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
@settings(max_examples=examples(40), deadline=None)
def test_dequantize_any_size_any_format_equals_the_oracle(n, blocksize, quant_type, nested, dtype, seed):
    """Any element count (tail blocks, odd counts), format and dtype: kernel == oracle, bit for bit."""
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    q, state = R.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    got = tritonbits.dequantize_4bit(q.to(DEVICE), to_bnb_quant_state(state, DEVICE))
    assert_exact(got.cpu(), R.dequantize_4bit(q, state))


@given(
    m=st.integers(min_value=1, max_value=70),
    n=st.integers(min_value=1, max_value=600),
    acc_dtype=st.sampled_from([torch.int32, torch.bfloat16, torch.float32]),
    out_dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    with_bias=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
@settings(max_examples=examples(40), deadline=None)
def test_dequant_bias_any_shape_within_policy(m, n, acc_dtype, out_dtype, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    if acc_dtype == torch.int32:
        acc = torch.randint(-(2**24), 2**24, (m, n), generator=gen, dtype=torch.int32)
        sa = (torch.rand(m, 1, generator=gen) + 0.5) * 1e-5
    else:
        acc = (torch.randn(m, n, generator=gen) * 30).to(acc_dtype)
        sa = torch.rand(m, 1, generator=gen) + 0.5
    sb = torch.rand(1, n, generator=gen) + 0.5
    bias = torch.randn(n, generator=gen) if with_bias else None
    move = lambda t: None if t is None else t.to(DEVICE)
    out = tritonbits.dequant_bias(move(acc), move(sa), move(sb), move(bias), out_dtype=out_dtype)
    assert_dequant_bias(out.cpu(), acc, sa, sb, bias)

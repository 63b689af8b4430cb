import bitsandbytes.functional as F
import numpy as np
import pytest
import torch

import tritonbits_reference as R
from tritonbits_reference import formats


@pytest.mark.parametrize("quant_type", formats.QUANT_TYPES)
def test_4bit_code_equals_bnb(quant_type):
    assert np.array_equal(formats.code_4bit(quant_type), F.get_4bit_type(quant_type, device="cpu").numpy())


def test_dynamic_code_equals_bnb():
    assert np.array_equal(formats.dynamic_code(), F.create_dynamic_map().numpy())


def test_unknown_quant_type_is_refused():
    with pytest.raises(ValueError, match="quant_type"):
        formats.code_4bit("int4")


def test_mul_ftz_flushes_subnormal_operands_and_products():
    """formats.mul_ftz, bnb CUDA's fast-math multiply: subnormal operands and results are zeros of their sign."""
    from tritonbits_reference.formats import flush, mul_ftz

    f = np.float32
    sub = f(1e-39)
    flushed = flush(np.array([sub, -sub, f(2.0**-126), -f(0.0)]))
    assert flushed.tobytes() == np.array([0.0, -0.0, 2.0**-126, -0.0], dtype=f).tobytes()
    a = np.array([-sub, sub, -1.0, -(2.0**-30), 2.0**-26, np.inf, np.nan], dtype=f)
    b = np.array([1e30, -1e30, 2.0**-127, 2.0**-100, 2.0**-100, 1e-39, 1.0], dtype=f)
    got = mul_ftz(a, b)
    want = np.array([-0.0, -0.0, -0.0, -0.0, 2.0**-126, np.nan, np.nan], dtype=f)
    assert np.array_equal(np.signbit(got[:5]), np.signbit(want[:5]))
    assert np.array_equal(got, want, equal_nan=True)


def test_mul_ftz_decides_tininess_before_rounding():
    """(1 - 2**-24) * 2**-126 = 2**-126 - 2**-150 exactly, which rounds to the normal 2**-126 but is flushed by
    the H100's mul.ftz.f32 (bnb CUDA's FP4 code for such a negative product was 0b0000, the oracle's 0b1000
    while it flushed after rounding); 2**-126 itself and (1 + 2**-23) * 2**-126 stay."""
    from tritonbits_reference.formats import mul_ftz

    f = np.float32
    a = np.array([1 - 2.0**-24, -(1 - 2.0**-24), 1.0, 1 + 2.0**-23, -(1 + 2.0**-23)], dtype=f)
    got = mul_ftz(a, np.full(5, 2.0**-126, dtype=f))
    want = np.array([0.0, -0.0, 2.0**-126, (1 + 2.0**-23) * 2.0**-126, -(1 + 2.0**-23) * 2.0**-126], dtype=f)
    assert got.tobytes() == want.tobytes()


def test_cuda_oracle_flushes_like_fast_math():
    """A negative subnormal in a normal block scales to -0.0 (FP4 code 0, no sign bit); a block of subnormals has
    absmax 0 in the 8-bit quantizer too (every index 0); an underflowing product is -0.0 as well."""
    x = torch.zeros(3, 64)
    x[0, 0], x[0, 1] = 1.0, -1e-39
    x[1, :] = 1e-39  # subnormals only
    x[2, 0], x[2, 1] = 2.0**100, -(2.0**-30)
    packed, state = R.quantize_4bit_cuda(x, blocksize=64, quant_type="fp4")
    assert packed[0, 0].item() == 0x30 and packed[64, 0].item() == 0x30  # 1.0 -> 0b0011, then 0b0000
    assert state.absmax[1].item() == 0.0
    q, s = R.quantize_blockwise_cuda(x, blocksize=64)
    assert s["absmax"][1].item() == 0.0 and (q[1] == 0).all()

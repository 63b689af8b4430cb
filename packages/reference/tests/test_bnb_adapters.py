import bitsandbytes.functional as F
import pytest
import torch

import tritonbits_reference as R
from tritonbits_reference import bnb as RB


@pytest.mark.parametrize("nested", [False, True])
def test_reference_state_round_trips_through_bnb(nested, gen):
    w = torch.randn(64, 256, generator=gen)
    q, ref_state = R.quantize_4bit(w, blocksize=64, quant_type="fp4", compress_statistics=nested)
    bnb_state = RB.to_bnb_quant_state(ref_state)
    assert isinstance(bnb_state, F.QuantState)
    assert bnb_state.nested == nested
    assert torch.equal(F.dequantize_4bit(q, bnb_state), R.dequantize_4bit(q, ref_state))
    fields = RB.quant_state_fields(bnb_state)
    assert fields["blocksize"] == 64 and fields["quant_type"] == "fp4" and fields["shape"] == w.shape
    assert (fields["state2"] is not None) == nested


def test_params4bit_and_linear4bit_on_cpu(gen):
    w = torch.randn(128, 64, generator=gen, dtype=torch.bfloat16)
    p = RB.params4bit(w, quant_type="nf4", blocksize=64)
    assert p.bnb_quantized and p.dtype == torch.uint8 and p.quant_state.nested
    assert torch.equal(R.dequantize_4bit(p.data, p.quant_state), RB.dequantize_4bit(p.data, p.quant_state))
    layer = RB.linear4bit(64, 96, dtype=torch.float16, bias=True, generator=gen)
    assert layer.weight.quant_state.shape == torch.Size([96, 64])
    assert layer.weight.quant_state.dtype == torch.float16

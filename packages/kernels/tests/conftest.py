import pytest
import torch


@pytest.fixture
def quantize(device):
    """Quantize a fresh weight with bitsandbytes on the test device (CUDA bnb on GPU, CPU bnb otherwise)."""
    import bitsandbytes.functional as F

    def make(w: torch.Tensor, **kwargs):
        return F.quantize_4bit(w.to(device), **kwargs)

    return make


@pytest.fixture
def bnb_dequantize(device):
    """bnb's own answer where the contract is bnb's (CUDA); the numpy oracle under the interpreter."""
    if device.type == "cuda":
        import bitsandbytes.functional as F

        return F.dequantize_4bit
    import tritonbits_reference as R

    return R.dequantize_4bit

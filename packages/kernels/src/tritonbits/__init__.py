"""tritonbits: Triton kernels for quantized LLM weights.

- ``dequantize_4bit(A, quant_state=None, *, out=None)``: bitsandbytes NF4/FP4 weights, one launch, bit-exact.
- ``quantize_4bit(A, ...)``, ``quantize_blockwise`` / ``dequantize_blockwise``: bnb's quantizers, byte-equal
  with bnb CUDA.
- ``dequant_bias(acc, scale_a, scale_b, bias=None, *, out_dtype=torch.bfloat16, out=None)``: the fused
  epilogue of INT8/FP8 GEMMs.

Depends on torch and triton only. Set TRITON_INTERPRET=1 before import to run on CPU tensors.
"""

from .__about__ import __version__
from .ops.blockwise_8bit import dequantize_blockwise, quantize_blockwise
from .ops.dequant_bias import dequant_bias
from .ops.dequantize_4bit import dequantize_4bit
from .ops.quantize_4bit import quantize_4bit
from .quant_state import QuantState

__all__ = [
    "QuantState",
    "__version__",
    "dequant_bias",
    "dequantize_4bit",
    "dequantize_blockwise",
    "quantize_4bit",
    "quantize_blockwise",
]

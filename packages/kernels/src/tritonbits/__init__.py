"""tritonbits: Triton kernels for quantized LLM weights.

- ``dequantize_4bit(A, quant_state=None, absmax=None, out=None, blocksize=None, quant_type="fp4")``:
  bitsandbytes NF4/FP4 weights, one launch, bit-exact (bnb's signature).
- ``dequant_bias(acc, scale_a, scale_b, bias=None, *, out_dtype=None, out=None)``: the fused epilogue of
  INT8/FP8 GEMMs.
- ``QuantState``: bnb's quant-state fields, ``from_any`` / ``from_dict`` / ``as_dict``.
- ``quantize_4bit(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_type="fp4",
  quant_storage=torch.uint8)``, ``quantize_blockwise`` / ``dequantize_blockwise``: bnb's quantizers, byte-equal
  with bnb CUDA.
- ``linear_4bit(x, weight, quant_state=None, bias=None)``: ``x @ dequant(weight).T + bias`` with the
  dequantization fused into the matmul (GEMV / GEMM / dequantize + cuBLAS by M); autograd for x and bias.
- ``nn.Linear4bit``: the drop-in layer on it (``from_bnb``, ``from_linear``, bnb-format state dicts).

Depends on torch and triton only. Set TRITON_INTERPRET=1 before import to run on CPU tensors (that needs
numpy: ``pip install 'tritonbits[cpu]'``). Layout and where a new op goes: docs/architecture.md.
"""

from . import (
    _runtime,  # noqa: F401  (first: refuses TRITON_INTERPRET=1 without numpy, saying how to fix it)
    nn,
)
from .__about__ import __version__
from .ops.blockwise_8bit import dequantize_blockwise, quantize_blockwise
from .ops.dequant_bias import dequant_bias
from .ops.dequantize_4bit import dequantize_4bit
from .ops.linear_4bit import linear_4bit
from .ops.quantize_4bit import quantize_4bit
from .quant_state import QuantState

__all__ = [
    "QuantState",
    "__version__",
    "dequant_bias",
    "dequantize_4bit",
    "dequantize_blockwise",
    "linear_4bit",
    "nn",
    "quantize_4bit",
    "quantize_blockwise",
]

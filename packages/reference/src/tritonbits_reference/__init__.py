"""Oracles that tritonbits is judged against: exact numpy/PyTorch models of bitsandbytes' formats,
a float64 model of the GEMM epilogue, adapters to real bnb objects, and the baselines benchmarks race.

This package never imports `tritonbits`: an oracle must not share code with what it judges.
"""

from .__about__ import __version__
from .dequant_bias import dequant_bias, dequant_bias_exact
from .dequantize_4bit import dequantize_4bit
from .formats import BLOCKSIZES_4BIT, FP4_CODE, NF4_CODE, QUANT_TYPES, dynamic_code
from .linear_4bit import dequantized_weight, linear_4bit
from .quant_state import NestedState, ReferenceQuantState
from .quantize_4bit import quantize_4bit
from .quantize_cuda import dequantize_blockwise_cuda, quantize_4bit_cuda, quantize_blockwise_cuda

__all__ = [
    "BLOCKSIZES_4BIT",
    "FP4_CODE",
    "NF4_CODE",
    "QUANT_TYPES",
    "NestedState",
    "ReferenceQuantState",
    "__version__",
    "dequant_bias",
    "dequant_bias_exact",
    "dequantize_4bit",
    "dequantize_blockwise_cuda",
    "dequantized_weight",
    "dynamic_code",
    "linear_4bit",
    "quantize_4bit",
    "quantize_4bit_cuda",
    "quantize_blockwise_cuda",
]

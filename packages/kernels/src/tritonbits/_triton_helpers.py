"""Small @triton.jit helpers shared by the ops."""

import triton
import triton.language as tl


@triton.jit
def round_to_bf16_bits(x):
    """fp32 -> bf16 bit pattern (as int16), round to nearest even, with integer ops only.

    For sm75, where Triton's bf16 conversion does not compile, and for the interpreter, which truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return tl.where(x != x, quiet_nan, rounded).to(tl.uint16).to(tl.int16, bitcast=True)

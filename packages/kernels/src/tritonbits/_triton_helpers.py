"""Small @triton.jit helpers shared by the ops: the bf16 store, the nibble decode, the two-rounding
multiply-add of the nested absmax (docs/format.md)."""

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


@triton.jit
def store_float(ptr, values, mask, MANUAL_BF16: tl.constexpr, eviction_policy: tl.constexpr):
    """Store fp32 `values` in ptr's dtype; with MANUAL_BF16, ptr is the int16 view of a bf16 tensor.
    eviction_policy: "" for none (no default: a jit default value does not compile as a constexpr)."""
    values = round_to_bf16_bits(values) if MANUAL_BF16 else values.to(ptr.dtype.element_ty)
    tl.store(ptr, values, mask=mask, eviction_policy=eviction_policy)


@triton.jit
def decode_nibbles(packed, code_ptr, eviction_policy: tl.constexpr):
    """(code[high nibble], code[low nibble]) of packed uint8 bytes: elements 2j and 2j+1 of byte j."""
    hi = tl.load(code_ptr + (packed >> 4).to(tl.int32), eviction_policy=eviction_policy)
    lo = tl.load(code_ptr + (packed & 0xF).to(tl.int32), eviction_policy=eviction_policy)
    return hi, lo


@triton.jit
def mul_add_rn(a, b, c, USE_ASM: tl.constexpr):
    """fl(fl(a * b) + c): two roundings, never one FMA (bnb rounds the nested absmax product and sum apart).

    USE_ASM spells them in PTX (mul.rn / add.rn cannot be contracted); otherwise the kernel must be compiled
    with enable_fp_fusion=False, which every launcher of a kernel calling this sets."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 t; mul.rn.f32 t, $1, $2; add.rn.f32 $0, t, $3; }",
            "=r,r,r,r", [a, b, c], dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip
    else:
        return a * b + c


@triton.jit
def reciprocal(x, RCP: tl.constexpr):
    """1 / x (fp32) as the quantizers need it. bnb's CUDA library is built with --use_fast_math, where
    `1.0f / x` is `rcp.approx.ftz.f32`: RCP="approx" spells that in PTX (GPU only). "ieee" is the correctly
    rounded reciprocal (div.rn); "plain" is Triton's own fp32 division (on the interpreter: numpy's, correctly
    rounded). Which one matches bnb byte for byte was measured, see ops/quantize_4bit.py."""
    if RCP == "approx":
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    elif RCP == "ieee":
        return tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), x)
    else:
        return 1.0 / x

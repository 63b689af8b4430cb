"""Small @triton.jit helpers shared by the ops: the bf16 store, the nibble decode, the two-rounding
multiply-add of the nested absmax, and bnb's fast-math arithmetic (its reciprocal and its flushing multiply;
docs/format.md)."""

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


FLT_MIN: tl.constexpr = tl.constexpr(1.1754943508222875e-38)  # 2**-126, the smallest normal float32 (exact)


@triton.jit
def flush_subnormal(v):
    """fp32 subnormals to a zero of the same sign (v * 0.0); NaN and Inf kept (|NaN| < FLT_MIN is false)."""
    return tl.where(tl.abs(v) < FLT_MIN, v * 0.0, v)


@triton.jit
def mul_ftz(a, b, FTZ: tl.constexpr):
    """fp32 a * b as bnb's --use_fast_math build computes it (`mul.ftz.f32`): subnormal operands and a subnormal
    product are zeros of the same sign. FTZ="ptx": mul.rn.ftz.f32, one instruction (FMUL.FTZ; .rn so that it
    is never contracted into an FMA); "emulate" (the interpreter, which runs no PTX): the operands flushed by
    hand, the product formed exactly in fp64 and flushed where it is below 2**-126 before rounding, as the
    hardware decides tininess (2**-126 - 2**-150 is flushed, though it rounds to 2**-126), else rounded to fp32
    (_runtime.ftz_mode picks). a and b broadcast as in a * b."""
    if FTZ == "ptx":
        return tl.inline_asm_elementwise(
            "mul.rn.ftz.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        exact = flush_subnormal(a).to(tl.float64) * flush_subnormal(b).to(tl.float64)
        return tl.where(tl.abs(exact) < FLT_MIN, exact * 0.0, exact).to(tl.float32)


@triton.jit
def abs_f32(x, FTZ: tl.constexpr):
    """|x| (fp32). FTZ="ptx": abs.f32 in PTX, which ptxas folds into its consumer as an operand modifier; LLVM
    would turn |x| of a value it sees as a bitcast integer (an unpacked bf16 pair, mul_ftz's result) into an
    integer AND, one more instruction a value. Otherwise tl.abs."""
    if FTZ == "ptx":
        return tl.inline_asm_elementwise("abs.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.abs(x)


@triton.jit
def gather(ptrs, FTZ: tl.constexpr):
    """The int32 or int64 values at `ptrs` (a table gather). FTZ="ptx" (a GPU, where PTX runs): one
    `ld.global.nc` each in inline PTX, which keeps the operands' register layout. NOTE: Triton 3.6 (the GPU
    machine's) gives a plain tl.load gather (pointers with no contiguity) a layout of its own, and the
    conversions to and from it go through shared memory: 11 (NF4) / 19 (FP4) shared round trips a program in
    the 4-bit quantizer with 64 / 112 registers, 41-50 in the 8-bit table encoder with 122-128 (sm90 SASS,
    `ci/sass_count.py` under triton 3.6, logs docs/gpu-runs/logs/*-offline-sm90-triton3.6-sass-count-*.txt;
    with the PTX load 1-2 and 50-52 / 72-76 registers, as triton 3.9 compiles tl.load). Else tl.load."""
    if FTZ == "ptx":
        if ptrs.dtype.element_ty == tl.int64:
            return tl.inline_asm_elementwise(
                "ld.global.nc.b64 $0, [$1];", "=l,l", [ptrs], dtype=tl.int64, is_pure=True, pack=1
            )
        else:
            return tl.inline_asm_elementwise(
                "ld.global.nc.b32 $0, [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=True, pack=1
            )
    else:
        return tl.load(ptrs)


@triton.jit
def mul_ftz_add_rn(a, b, c, USE_ASM: tl.constexpr, FTZ: tl.constexpr):
    """fl(ftz(fl(a * b)) + c): two roundings, never one FMA, and bnb's flushing product. bnb's nested absmax
    is its dequantize_blockwise kernel's product (mul.ftz) plus the offset added by torch (no flush). USE_ASM:
    both in PTX (mul.rn / add.rn cannot be contracted); otherwise mul_ftz (in PTX where FTZ="ptx", so never
    contracted) and a plain add, in a kernel compiled with enable_fp_fusion=False."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 t; mul.rn.ftz.f32 t, $1, $2; add.rn.f32 $0, t, $3; }",
            "=r,r,r,r", [a, b, c], dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip
    else:
        return mul_ftz(a, b, FTZ) + c


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

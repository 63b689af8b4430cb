"""The fused 4-bit linear: out = x @ dequant(W).T + bias, dequantizing inside the matmul.

    w[n, k]   = to_wdtype(ftz(fl(code4[nibble(n*K + k)] * absmax[(n*K + k) // blocksize])))  (dequantize_4bit's)
    out[m, n] = to_xdtype(sum_k fl32(x[m, k] * w[n, k]) + bias[n])                      fp32 accumulation

W is bnb's packed [N, K] weight (row-major, two codes per byte, high nibble first: docs/format.md), its quant
state read through `quant_state.prepare` as dequantize_4bit reads it; the nested absmax is decoded in the kernel
with bnb's two fp32 roundings, and every product is flushed as bnb's fast-math multiply flushes it (a result
below 2**-126 is a signed zero: `_triton_helpers.mul_ftz`), so every weight the kernel multiplies equals
dequantize_4bit's output bit for bit.
x: [..., K] fp16/bf16/fp32 (any strides); out: [..., N] in x's dtype.

Six paths, chosen per M bucket from configs/linear_4bit.json (`config_for`; heuristic_config for keys the table
lacks: for 16-bit x the mma kernel up to M=16 (M=8 where N <= 2048), on Hopper (sm90) the wgmma kernel at M=17..256
for N > 2048 and K a multiple of 256, elsewhere the tensor-core gemm up to M=128, dequantize + cuBLAS above; gemv2
where mma cannot run at M <= 2: see the NOTEs):
- "mma" (16-bit x, M <= 16 by default, up to 64 by config): linear_4bit_mma's Gluon kernel (per-block tables in
  each thread, byte-permute decode straight into mma.sync operands; its module doc);
- "wgmma" (16-bit x on sm90, M = 17..256 by default): linear_4bit_wgmma's Gluon kernel (the same decode straight
  into wgmma's register operand, x's copy in the kernel's K order through shared memory; its module doc);
- "gemv" (small M): a program owns BLOCK_N rows of W and a K range (split-K); each packed byte is read once,
  decoded in registers (a 256-entry pair table or the 16-entry code table), scaled by the row's absmax for this
  K chunk, rounded to W's dtype and multiplied into a [BLOCK_M, BLOCK_N, BLOCK_K/2] fp32 accumulator reduced
  once at the end (gemv2's and, up to M=4, the gemm's fallback where the packed bytes cannot be read as int32
  words: `aligned_config`);
- "gemv2" (M <= 2 by default): x's K chunk held in registers while a program walks down W's rows; W read as int32
  words, each decoded by one PTX block (shuffle lookup, mul.rn.ftz, one rounding conversion);
- "gemm" (M = 17..128 by default, and where mma cannot run): W as the tensor-core dot's left operand (out^T = W @
  x^T: BLOCK_N rows of W are the long side of the tile, so a small M pads only the short one); W read as int32
  words, decoded by the same PTX lookup straight to W's 16-bit dtype, interleaved into K order in registers, fed to
  tl.dot with x's chunk (fp16/bf16 operands when x and W share that dtype, else fp32 with input_precision="ieee");
- "dequant" (large M, or K not a multiple of the K tile): dequantize_4bit + torch.matmul (cuBLAS).
Summation order (documented for the accuracy policy, tritonbits_harness.tolerance.MATMUL_FP32_ACC): inside a
program, fp32 products added chunk by chunk in K order (gemv: per lane, then a tree sum across the K/2 lanes;
gemm: tl.dot's order; mma and wgmma: their module docs); with split-K, each split's fp32 partial goes to a
workspace and a second kernel adds the partials in split order 0..S-1, then the bias, and rounds once.
Deterministic: no atomics.
Autograd: d x = grad @ dequant(W) (dequantize + matmul), d bias = grad summed over rows; W is frozen.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from .. import _runtime, configs, formats
from .._launcher import BoundLaunch, CachedLauncher
from .._triton_helpers import mul_ftz, mul_ftz_add_rn, store_float
from ..quant_state import PreparedWeight, QuantState, prepare, prepared_entry, validate
from . import dequantize_4bit as dq
from . import linear_4bit_mma as mma4
from . import linear_4bit_wgmma as wg4

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_W_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # W_DTYPE / DOT_DTYPE constexprs

# NOTE: the nested absmax needs two fp32 roundings (mul_ftz_add_rn). On a GPU the kernels spell them in PTX and
# keep fp fusion ON: with fusion off every `acc += w * x` would become a multiply and an add (twice the
# instructions in the GEMV's inner loop). The interpreter has no inline PTX: fusion off there (no effect).
USE_ASM_DEFAULT = not _runtime.INTERPRET


@triton.jit
def _round_weight(w, W_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """fp32 -> W's dtype -> fp32 (exact): the value dequantize_4bit stores. MANUAL_BF16: integer round to
    nearest even (the interpreter truncates, sm75 has no conversion)."""
    if W_DTYPE == 1:
        return w.to(tl.float16).to(tl.float32)
    elif W_DTYPE == 2:
        if MANUAL_BF16:
            bits = w.to(tl.uint32, bitcast=True)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            return tl.where(w != w, w, rounded.to(tl.float32, bitcast=True))
        else:
            return w.to(tl.bfloat16).to(tl.float32)
    else:
        return w


@triton.jit
def _decode(packed, table_ptr, PAIR: tl.constexpr):
    """(code[high nibble], code[low nibble]) as fp32. PAIR: table_ptr is the 256-entry int64 pair table (one
    8-byte gather per byte: low word = code[hi], high word = code[lo]); else the 16-entry fp32 code table."""
    if PAIR:
        v = tl.load(table_ptr + packed.to(tl.int32))
        hi = v.to(tl.int32).to(tl.float32, bitcast=True)
        lo = (v >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        return hi, lo
    else:
        hi = tl.load(table_ptr + (packed >> 4).to(tl.int32))
        lo = tl.load(table_ptr + (packed & 0xF).to(tl.int32))
        return hi, lo


@triton.jit
def _row_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, qblock, mask,
                BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, USE_ASM: tl.constexpr,
                FTZ: tl.constexpr):  # fmt: skip
    """The fp32 absmax of blocks `qblock` (nested: fl(ftz(fl(code2[q] * absmax2)) + offset), as bnb rounds and
    flushes it: dequantize_4bit's value)."""
    if NESTED:
        q = tl.load(absmax_ptr + qblock, mask=mask, other=0).to(tl.int32)
        c2 = tl.load(code2_ptr + q)
        a2 = tl.load(absmax2_ptr + qblock // BLOCKSIZE2, mask=mask, other=0.0)
        return mul_ftz_add_rn(c2, a2, tl.load(offset_ptr), USE_ASM, FTZ)
    else:
        return tl.load(absmax_ptr + qblock, mask=mask, other=0.0)


@triton.jit
def _dequant_chunk(packed_ptr, absmax_ptr, table_ptr, code2_ptr, absmax2_ptr, offset_ptr, row_base, row_ok, kb0,
                   BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, W_DTYPE: tl.constexpr,
                   MANUAL_BF16: tl.constexpr, USE_ASM: tl.constexpr, FTZ: tl.constexpr, PAIR: tl.constexpr,
                   NB: tl.constexpr, CB: tl.constexpr):  # fmt: skip
    """W[rows, k0 : k0 + 2*NB*CB] as (even columns, odd columns), each [BLOCK_N, NB, CB] fp32 holding W's dtype
    values: NB sub-chunks of CB packed bytes, each inside one quantization block (one absmax per row and
    sub-chunk). row_base: each row's first byte (int64); kb0: the chunk's first byte in the row, so column
    2*(kb0 + b*CB + j) (+1 for odd) sits at [:, b, j]."""
    b = tl.arange(0, NB)
    j = tl.arange(0, CB)
    first = row_base + kb0  # [BLOCK_N]
    byte = first[:, None, None] + (b * CB)[None, :, None] + j[None, None, :]
    packed = tl.load(packed_ptr + byte, mask=row_ok[:, None, None], other=0, eviction_policy="evict_first")
    qblock = (first[:, None] + (b * CB)[None, :]) // (BLOCKSIZE // 2)
    absmax = _row_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, qblock, row_ok[:, None], BLOCKSIZE2,
                         NESTED, USE_ASM, FTZ)  # fmt: skip
    hi, lo = _decode(packed, table_ptr, PAIR)
    w_even = _round_weight(mul_ftz(hi, absmax[:, :, None], FTZ), W_DTYPE, MANUAL_BF16)
    w_odd = _round_weight(mul_ftz(lo, absmax[:, :, None], FTZ), W_DTYPE, MANUAL_BF16)
    return w_even, w_odd


@triton.jit
def _store_tile(total, pid_k, bias_ptr, out_ptr, ms, rows, M, N, stride_om,
                HAS_BIAS: tl.constexpr, OUT_MANUAL_BF16: tl.constexpr, SPLIT: tl.constexpr):  # fmt: skip
    """SPLIT: this split's fp32 partial into the workspace [S, M, N]; else + bias, rounded once, into out
    (OUT_MANUAL_BF16: out is the int16 view of a bf16 tensor, rounded with integer ops)."""
    mask = (ms < M)[:, None] & (rows < N)[None, :]
    if SPLIT:
        offs = (pid_k.to(tl.int64) * M + ms.to(tl.int64)[:, None]) * N + rows[None, :]
        tl.store(out_ptr + offs, total, mask=mask)
    else:
        if HAS_BIAS:
            total += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
        store_float(out_ptr + ms.to(tl.int64)[:, None] * stride_om + rows[None, :], total, mask, OUT_MANUAL_BF16, "")


@triton.jit
def _linear_4bit_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, table_ptr, code2_ptr, absmax2_ptr, offset_ptr, bias_ptr, out_ptr,
    M, N, K_BYTES, stride_xm, stride_xk, stride_om, split_bytes,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    W_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr, OUT_MANUAL_BF16: tl.constexpr, USE_ASM: tl.constexpr,
    FTZ: tl.constexpr, SPLIT: tl.constexpr, PAIR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (m, n, s): out rows ms = m*BLOCK_M.., W rows n*BLOCK_N.., K range [s*k_per_split, ...).
    Each packed byte of the range is loaded once per program; acc[BLOCK_M, BLOCK_N, NB, CB] += w * x
    elementwise (even and odd columns), summed over its last two axes once at the end. A K chunk of BLOCK_K
    columns is NB sub-chunks of CB bytes, each inside one quantization block."""
    CB: tl.constexpr = min(BLOCK_K, BLOCKSIZE) // 2
    NB: tl.constexpr = BLOCK_K // (2 * CB)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_base = rows.to(tl.int64) * K_BYTES
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    x_rows = x_ptr + ms.to(tl.int64)[:, None, None] * stride_xm
    m_ok = (ms < M)[:, None, None]
    col2 = 2 * ((tl.arange(0, NB) * CB)[:, None] + tl.arange(0, CB)[None, :])  # [NB, CB]: even column offsets
    kb_lo = pid_k * split_bytes
    kb_hi = tl.minimum(kb_lo + split_bytes, K_BYTES)
    acc = tl.zeros((BLOCK_M, BLOCK_N, NB, CB), dtype=tl.float32)
    for kb0 in range(kb_lo, kb_hi, BLOCK_K // 2):
        kb0 = tl.multiple_of(kb0, BLOCK_K // 2)
        w_even, w_odd = _dequant_chunk(packed_ptr, absmax_ptr, table_ptr, code2_ptr, absmax2_ptr, offset_ptr,
                                       row_base, row_ok, kb0, BLOCKSIZE, BLOCKSIZE2, NESTED, W_DTYPE, MANUAL_BF16,
                                       USE_ASM, FTZ, PAIR, NB, CB)  # fmt: skip
        kk = (2 * kb0 + col2).to(tl.int64)[None, :, :] * stride_xk
        x_even = tl.load(x_rows + kk, mask=m_ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x_rows + kk + stride_xk, mask=m_ok, other=0.0).to(tl.float32)
        # NOTE: two statements, two FMAs per byte (one expression compiled to mul + fma + add: 96 mul.f32, 32 fma,
        # 32 add per 32 bytes in the PTX of the bm=1, bn=64, bk=256 loop)
        acc += w_even[None, :, :, :] * x_even[:, None, :, :]
        acc += w_odd[None, :, :, :] * x_odd[:, None, :, :]
    total = tl.sum(tl.sum(acc, axis=3), axis=2)
    _store_tile(total, pid_k, bias_ptr, out_ptr, ms, rows, M, N, stride_om, HAS_BIAS, OUT_MANUAL_BF16, SPLIT)


# "gemv2": W read as int32 words (8 weights each) and decoded by one PTX block per word.
# NOTE: the code lookup is a warp shuffle from a register (every lane holds code[lane & 15], loaded once per
# program): shfl's segment mask 0x10 keeps the source lane's low 4 bits, so a nibble needs one shift at most
# (7 shifts per word) and no address math. bf16: `cvt.rn.bf16x2.f32 d, w, 0` leaves round_to_nearest_even(w)
# in d's high half and zeros below: the rounded weight's fp32 bits in one instruction. Offline SASS counts
# (sm90, triton 3.6): HEURISTIC_GEMV2's NOTE.
_LANE_CODE_ASM = tl.constexpr(
    "{ .reg .b32 l; .reg .b64 a; mov.u32 l, %laneid; and.b32 l, l, 15; mad.wide.u32 a, l, 4, $1; "
    "ld.global.nc.b32 $0, [a]; }"
)


def _word_decode_asm(w_dtype: int, operand: bool = False) -> str:
    """PTX: packed int32 word $8 (bytes little-endian; byte j holds elements 2j (high nibble) and 2j+1) into
    its 8 weights $0..$7, each to_wdtype(ftz(fl32(code[q] * absmax $9))) as fp32 bits; $10: this lane's
    code[lane & 15] (_LANE_CODE_ASM). `operand` (w_dtype 1 or 2): each weight left in W's 16-bit dtype instead,
    the tensor-core operand itself (one rounding conversion, no fp32 bits; the gemm). Every lane of the warp
    must execute it (shfl.sync with a full mask): Triton runs elementwise asm in all threads, replicated
    elements included, and the kernels have no divergent branch around it."""
    lines = ["{", ".reg .b32 s, c, z;", ".reg .b16 h;", "mov.b32 z, 0;"]
    for e in range(8):
        shift = 8 * (e // 2) + (4 if e % 2 == 0 else 0)
        src = "$8"
        if shift:
            lines.append(f"shr.u32 s, $8, {shift};")
            src = "s"
        lines.append(f"shfl.sync.idx.b32 c, $10, {src}, 0x100f, -1;")
        if operand:
            lines += ["mul.rn.ftz.f32 c, c, $9;", f"cvt.rn.{'bf16' if w_dtype == 2 else 'f16'}.f32 ${e}, c;"]
        elif w_dtype == 2:
            lines += ["mul.rn.ftz.f32 c, c, $9;", f"cvt.rn.bf16x2.f32 ${e}, c, z;"]
        elif w_dtype == 1:
            lines += ["mul.rn.ftz.f32 c, c, $9;", "cvt.rn.f16.f32 h, c;", f"cvt.f32.f16 ${e}, h;"]
        else:
            lines.append(f"mul.rn.ftz.f32 ${e}, c, $9;")
    lines.append("}")
    return " ".join(lines)


_WORD_ASM_F32 = tl.constexpr(_word_decode_asm(0))
_WORD_ASM_F16 = tl.constexpr(_word_decode_asm(1))
_WORD_ASM_BF16 = tl.constexpr(_word_decode_asm(2))


@triton.jit
def _lane_code(table_ptr, like, LOOKUP_ASM: tl.constexpr):
    """code[lane & 15] in every thread (the shuffle table), shaped like `like`; 0 without the asm lookup."""
    if LOOKUP_ASM:
        return tl.inline_asm_elementwise(_LANE_CODE_ASM, "=r,l", [table_ptr + like * 0], dtype=tl.float32,
                                         is_pure=True, pack=1)  # fmt: skip
    else:
        return tl.zeros(like.shape, tl.float32)


@triton.jit
def _word_asm(word, absmax, lane_code, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(
        ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [word, absmax, lane_code],
        dtype=(tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32, tl.float32),
        is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _decode_word(word, absmax, table_ptr, lane_code, W_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr,
                 LOOKUP_ASM: tl.constexpr, FTZ: tl.constexpr):  # fmt: skip
    """The 8 weights of packed int32 words (elements 8i..8i+7 of the row) as fp32, each dequantize_4bit's
    to_wdtype(ftz(fl32(code[q] * absmax))). LOOKUP_ASM: one PTX block per word (_word_decode_asm); else table
    gathers and _round_weight (the interpreter, sm75)."""
    if LOOKUP_ASM:
        if W_DTYPE == 2:
            return _word_asm(word, absmax, lane_code, _WORD_ASM_BF16)
        elif W_DTYPE == 1:
            return _word_asm(word, absmax, lane_code, _WORD_ASM_F16)
        else:
            return _word_asm(word, absmax, lane_code, _WORD_ASM_F32)
    else:
        w0 = _round_weight(mul_ftz(tl.load(table_ptr + ((word >> 4) & 15)), absmax, FTZ), W_DTYPE, MANUAL_BF16)
        w1 = _round_weight(mul_ftz(tl.load(table_ptr + (word & 15)), absmax, FTZ), W_DTYPE, MANUAL_BF16)
        w2 = _round_weight(mul_ftz(tl.load(table_ptr + ((word >> 12) & 15)), absmax, FTZ), W_DTYPE, MANUAL_BF16)
        w3 = _round_weight(mul_ftz(tl.load(table_ptr + ((word >> 8) & 15)), absmax, FTZ), W_DTYPE, MANUAL_BF16)
        w4 = _round_weight(mul_ftz(tl.load(table_ptr + ((word >> 20) & 15)), absmax, FTZ), W_DTYPE, MANUAL_BF16)
        w5 = _round_weight(mul_ftz(tl.load(table_ptr + ((word >> 16) & 15)), absmax, FTZ), W_DTYPE, MANUAL_BF16)
        w6 = _round_weight(mul_ftz(tl.load(table_ptr + ((word >> 28) & 15)), absmax, FTZ), W_DTYPE, MANUAL_BF16)
        w7 = _round_weight(mul_ftz(tl.load(table_ptr + ((word >> 24) & 15)), absmax, FTZ), W_DTYPE, MANUAL_BF16)
        return w0, w1, w2, w3, w4, w5, w6, w7


@triton.jit
def _x_column(x_rows, col, m_ok, stride_xk, E: tl.constexpr):
    """x[ms, 8 * col + E] as fp32 ([NB, BLOCK_M, 1, CW]; col: word index in the row, int64)."""
    return tl.load(x_rows + (8 * col + E) * stride_xk, mask=m_ok, other=0.0).to(tl.float32)


@triton.jit
def _gemv2_step_inputs(words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows, row_end, K_WORDS, col, sub,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                       USE_ASM: tl.constexpr, FTZ: tl.constexpr):  # fmt: skip
    """One gemv2 row step's inputs: the int32 words of `rows` in the program's K chunk ([NB, 1, BLOCK_N, CW]) and
    the fp32 absmax of each row's sub-chunks ([NB, 1, BLOCK_N]); rows at or past row_end read as 0."""
    row_ok = rows < row_end
    words = tl.load(words_ptr + (rows.to(tl.int64) * K_WORDS)[None, None, :, None] + col[:, None, None, :],
                    mask=row_ok[None, None, :, None], other=0, eviction_policy="evict_first")  # fmt: skip
    # blocks run over the flattened weight (a row may start inside one); a sub-chunk never straddles two
    qblock = ((rows.to(tl.int64) * K_WORDS)[None, None, :] + sub[:, None, None]) // (BLOCKSIZE // 8)
    absmax = _row_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, qblock, row_ok[None, None, :],
                         BLOCKSIZE2, NESTED, USE_ASM, FTZ)  # fmt: skip
    return words, absmax


@triton.jit
def _linear_4bit_gemv2_kernel(
    x_ptr, words_ptr, absmax_ptr, table_ptr, code2_ptr, absmax2_ptr, offset_ptr, bias_ptr, out_ptr,
    M, N, K_WORDS, stride_xm, stride_xk, stride_om, rows_per_program,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    W_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr, OUT_MANUAL_BF16: tl.constexpr, USE_ASM: tl.constexpr,
    FTZ: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr,
):  # fmt: skip
    """ "gemv2". Program (m, n, s): out rows ms = m*BLOCK_M.., the K chunk [s*BLOCK_K, (s+1)*BLOCK_K) (one chunk,
    no K loop), W rows [n*rows_per_program, ...) walked in steps of BLOCK_N. x's chunk is loaded once, as fp32,
    and stays in registers while the program walks down the rows; W is read as int32 words (8 weights each,
    16-byte loads), decoded by _decode_word; per word the 8 products are added in element order into one fp32
    sum, then the words of the chunk are summed (tl.sum's tree) into each row step's [BLOCK_M, BLOCK_N]
    partial, stored to the split-K workspace (or, with one chunk, + bias into out). A chunk is NB sub-chunks of
    CW words, each inside one quantization block (one absmax per row and sub-chunk)."""
    CW: tl.constexpr = min(BLOCK_K, BLOCKSIZE) // 8
    NB: tl.constexpr = BLOCK_K // (8 * CW)
    LOOKUP_ASM: tl.constexpr = USE_ASM and not MANUAL_BF16
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    x_rows = x_ptr + ms.to(tl.int64)[None, :, None, None] * stride_xm
    m_ok = (ms < M)[None, :, None, None]
    kw0 = pid_k * (BLOCK_K // 8)  # the chunk's first word in a row
    col = kw0 + (tl.arange(0, NB) * CW)[:, None] + tl.arange(0, CW)[None, :]  # [NB, CW]
    xcol = col.to(tl.int64)[:, None, None, :]
    x0 = _x_column(x_rows, xcol, m_ok, stride_xk, 0)
    x1 = _x_column(x_rows, xcol, m_ok, stride_xk, 1)
    x2 = _x_column(x_rows, xcol, m_ok, stride_xk, 2)
    x3 = _x_column(x_rows, xcol, m_ok, stride_xk, 3)
    x4 = _x_column(x_rows, xcol, m_ok, stride_xk, 4)
    x5 = _x_column(x_rows, xcol, m_ok, stride_xk, 5)
    x6 = _x_column(x_rows, xcol, m_ok, stride_xk, 6)
    x7 = _x_column(x_rows, xcol, m_ok, stride_xk, 7)
    sub = kw0 + tl.arange(0, NB) * CW  # [NB]: each sub-chunk's first word in the row
    row_lo = pid_n * rows_per_program
    row_hi = tl.minimum(row_lo + rows_per_program, N)
    lane_code = _lane_code(table_ptr, tl.zeros((NB, 1, BLOCK_N, CW), tl.int32), LOOKUP_ASM)
    if PREFETCH:  # the first row step's words and absmax, loaded before the loop (see _gemv2_step_inputs)
        next_words, next_absmax = _gemv2_step_inputs(words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
                                                     row_lo + tl.arange(0, BLOCK_N), row_hi, K_WORDS, col, sub,
                                                     BLOCKSIZE, BLOCKSIZE2, NESTED, USE_ASM, FTZ)  # fmt: skip
    for r0 in range(row_lo, row_hi, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        if PREFETCH:  # this step's inputs were loaded by the step before; load the next step's now
            words, absmax = next_words, next_absmax
            next_words, next_absmax = _gemv2_step_inputs(words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
                                                         rows + BLOCK_N, row_hi, K_WORDS, col, sub, BLOCKSIZE,
                                                         BLOCKSIZE2, NESTED, USE_ASM, FTZ)  # fmt: skip
        else:
            words, absmax = _gemv2_step_inputs(words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows,
                                               N, K_WORDS, col, sub, BLOCKSIZE, BLOCKSIZE2, NESTED, USE_ASM,
                                               FTZ)  # fmt: skip
        w0, w1, w2, w3, w4, w5, w6, w7 = _decode_word(words, absmax[:, :, :, None], table_ptr, lane_code, W_DTYPE,
                                                      MANUAL_BF16, LOOKUP_ASM, FTZ)  # fmt: skip
        # NOTE: one statement per element, each an FFMA into the word's running sum (fusion on)
        acc = w0 * x0
        acc += w1 * x1
        acc += w2 * x2
        acc += w3 * x3
        acc += w4 * x4
        acc += w5 * x5
        acc += w6 * x6
        acc += w7 * x7
        total = tl.sum(tl.sum(acc, axis=3), axis=0)  # [BLOCK_M, BLOCK_N]
        _store_tile(total, pid_k, bias_ptr, out_ptr, ms, rows, M, N, stride_om, HAS_BIAS, OUT_MANUAL_BF16, SPLIT)


# "gemm": the same word decode, 16-bit outputs, fed to tensor cores with W as the dot's left operand.
_WORD16_ASM_F16 = tl.constexpr(_word_decode_asm(1, operand=True))
_WORD16_ASM_BF16 = tl.constexpr(_word_decode_asm(2, operand=True))


@triton.jit
def _word16_asm(word, absmax, lane_code, BF16: tl.constexpr):
    if BF16:
        return tl.inline_asm_elementwise(
            _WORD16_ASM_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [word, absmax, lane_code],
            dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16,
                   tl.bfloat16), is_pure=True, pack=1,
        )  # fmt: skip
    else:
        return tl.inline_asm_elementwise(
            _WORD16_ASM_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [word, absmax, lane_code],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16),
            is_pure=True, pack=1,
        )  # fmt: skip


@triton.jit
def _interleave8(w0, w1, w2, w3, w4, w5, w6, w7):
    """[..., 2, 2, 2] holding w_e at flat index e of its last three axes (e = 4a + 2b + c)."""
    even = tl.join(tl.join(w0, w4), tl.join(w2, w6))
    odd = tl.join(tl.join(w1, w5), tl.join(w3, w7))
    return tl.join(even, odd)


@triton.jit
def _gemm_w_tile(words, absmax, table_ptr, lane_code, W_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr,
                 LOOKUP_ASM: tl.constexpr, FTZ: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):  # fmt: skip
    """The dot's left operand: words [BLOCK_N, NB, CW] decoded to W [BLOCK_N, BLOCK_K] in K order, in the dot's
    dtype (W's 16-bit dtype straight from the PTX when they agree, else fp32 values of W's dtype)."""
    if LOOKUP_ASM and DOT_DTYPE == 2 and W_DTYPE == 2:
        w0, w1, w2, w3, w4, w5, w6, w7 = _word16_asm(words, absmax, lane_code, True)
    elif LOOKUP_ASM and DOT_DTYPE == 1 and W_DTYPE == 1:
        w0, w1, w2, w3, w4, w5, w6, w7 = _word16_asm(words, absmax, lane_code, False)
    else:
        w0, w1, w2, w3, w4, w5, w6, w7 = _decode_word(words, absmax, table_ptr, lane_code, W_DTYPE, MANUAL_BF16,
                                                      LOOKUP_ASM, FTZ)  # fmt: skip
    w = tl.reshape(_interleave8(w0, w1, w2, w3, w4, w5, w6, w7), (BLOCK_N, BLOCK_K))
    if DOT_DTYPE == 1:
        return w.to(tl.float16)
    elif DOT_DTYPE == 2:
        return w.to(tl.bfloat16)
    else:
        return w.to(tl.float32)


@triton.jit
def _linear_4bit_gemm_kernel(
    x_ptr, words_ptr, absmax_ptr, table_ptr, code2_ptr, absmax2_ptr, offset_ptr, bias_ptr, out_ptr,
    M, N, K_WORDS, stride_xm, stride_xk, stride_om, split_words,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    W_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr, OUT_MANUAL_BF16: tl.constexpr, USE_ASM: tl.constexpr,
    FTZ: tl.constexpr, SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """ "gemm". Program (n, m, s): out[ms, rows]^T = W[rows, :] @ x[ms, :]^T over K range s, W as the dot's
    left operand (BLOCK_N rows: the tensor-core tile's long side, so a small M pads only the short one). Per K
    chunk the W tile is read as int32 words ([BLOCK_N, NB, CW], K contiguous, 16-byte loads), decoded per word
    (_gemm_w_tile), interleaved into K order in registers and multiplied with x's [BLOCK_K, BLOCK_M] chunk;
    fp32 accumulator. A chunk is NB sub-chunks of CW words, each inside one quantization block. DOT_DTYPE:
    1/2 = fp16/bf16 operands (x and W of that dtype: exact), 0 = fp32 "ieee"."""
    CW: tl.constexpr = min(BLOCK_K, BLOCKSIZE) // 8
    NB: tl.constexpr = BLOCK_K // (8 * CW)
    LOOKUP_ASM: tl.constexpr = USE_ASM and not MANUAL_BF16
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_word = rows.to(tl.int64) * K_WORDS
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    x_cols = x_ptr + ms.to(tl.int64)[None, :] * stride_xm  # [1, BLOCK_M]
    m_ok = (ms < M)[None, :]
    sub = tl.arange(0, NB) * CW  # each sub-chunk's first word in the chunk
    col = sub[:, None] + tl.arange(0, CW)[None, :]  # [NB, CW]
    kk = tl.arange(0, BLOCK_K)
    lane_code = _lane_code(table_ptr, tl.zeros((BLOCK_N, NB, CW), tl.int32), LOOKUP_ASM)
    kw_lo = pid_k * split_words
    kw_hi = tl.minimum(kw_lo + split_words, K_WORDS)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kw0 in range(kw_lo, kw_hi, BLOCK_K // 8):
        kw0 = tl.multiple_of(kw0, BLOCK_K // 8)
        words = tl.load(words_ptr + (row_word + kw0)[:, None, None] + col[None, :, :],
                        mask=row_ok[:, None, None], other=0, eviction_policy="evict_first")  # fmt: skip
        # blocks run over the flattened weight (a row may start inside one); a sub-chunk never straddles two
        qblock = (row_word[:, None] + (kw0 + sub)[None, :]) // (BLOCKSIZE // 8)  # [BLOCK_N, NB]
        absmax = _row_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, qblock, row_ok[:, None], BLOCKSIZE2,
                             NESTED, USE_ASM, FTZ)  # fmt: skip
        w = _gemm_w_tile(words, absmax[:, :, None], table_ptr, lane_code, W_DTYPE, MANUAL_BF16, LOOKUP_ASM, FTZ,
                         DOT_DTYPE, BLOCK_N, BLOCK_K)  # fmt: skip
        xt = tl.load(x_cols + (8 * kw0 + kk).to(tl.int64)[:, None] * stride_xk, mask=m_ok, other=0.0)
        if DOT_DTYPE == 1:
            acc = tl.dot(w, xt.to(tl.float16), acc)
        elif DOT_DTYPE == 2:
            acc = tl.dot(w, xt.to(tl.bfloat16), acc)
        else:
            acc = tl.dot(w, xt.to(tl.float32), acc, input_precision="ieee")
    _store_tile(tl.trans(acc), pid_k, bias_ptr, out_ptr, ms, rows, M, N, stride_om, HAS_BIAS, OUT_MANUAL_BF16,
                SPLIT)  # fmt: skip


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, out_ptr, M, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                          MANUAL_BF16: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """out[m, n] = round(sum_{s=0..S-1} ws[s, m, n] (in split order) + bias[n]); out is contiguous [M, N]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mn = (offs * 0 + M) * N  # int64; M and N may arrive as constants (Triton specializes == 1)
    mask = offs < mn
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        total += tl.load(ws_ptr + s * mn + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    store_float(out_ptr + offs, total, mask, MANUAL_BF16, "")


# ---------------------------------------------------------------------------------------------------
# Configs: {"path", "bm", "bn", "bk", "split_k", "warps", "stages", "pair"} per GPU family and key; gemv2 takes
# "rows" (W rows a program) or "per_sm" (programs an SM, the rows worked out from it; "rows" wins) instead of
# "split_k", and "prefetch"; mma takes {"path", "warps", "split_k", "kwarps", "prefetch"} (kwarps: of the warps, those
# splitting a program's K range; 1 when absent).


def bucket(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


M_BUCKET_MAX, N_BUCKET_MAX, K_BUCKET_MAX = 4096, 32768, 32768


def config_key(x_dtype: torch.dtype, m: int, n: int, k: int) -> str:
    """The table key (the tuner writes with it): x's width class and power-of-two buckets of M, N, K.
    NOTE: fp16 and bf16 share entries (same bytes moved, same tensor-core rate); fp32 x has its own."""
    width = "x32" if x_dtype == torch.float32 else "x16"
    return f"{width}/m{min(bucket(m), M_BUCKET_MAX)}/n{min(bucket(n), N_BUCKET_MAX)}/k{min(bucket(k), K_BUCKET_MAX)}"


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_for(programs: int, k: int, bk: int, sms: int, waves: int = 2) -> int:
    """Split K until the grid covers ~`waves` programs an SM, keeping >= 4 K chunks per split."""
    split = 1
    while programs * split < waves * sms and k // (bk * split * 2) >= 4:
        split *= 2
    return split


# NOTE: H100 sweep (docs/gpu-runs/logs/20261123T0430Z-nvidia-h100-linear4bit-sweep.txt; bf16 x, nf4 nested bs64,
# K=4096 N=14336, CUDA-graph medians): the gemv likes narrow row tiles and long K chunks, and the 16-entry code
# table over the pair table: M=1 43.4 us at BLOCK_N=16 BLOCK_K=256 4 warps split 2 (16-entry), 50.0 us with the
# pair table, 51.6-70.0 us at BLOCK_N 64-128. M=2 52.3 us (BLOCK_N=32, BLOCK_K=128, split 4), M=4 67.4 us
# (BLOCK_N=128, BLOCK_K=64, 8 warps, split 8). The first tl.dot gemm (W the right operand, decoded into even and
# odd columns from bytes) lost to dequantize_4bit + cuBLAS everywhere it ran: M=8 179 us vs 100, M=16 193 vs 100,
# M=64 374 vs 98 (its W tile went through shared memory element by element); the gemm that replaced it: see
# HEURISTIC_GEMM's NOTE.
HEURISTIC_GEMV = {1: (16, 256, 4, 2), 2: (32, 128, 4, 4), 4: (128, 64, 8, 8)}  # bm: (BLOCK_N, BLOCK_K, warps, split)
# NOTE: gemv2 (x in registers, 16-byte words, shuffle lookup). Its tile is [NB, BLOCK_M, BLOCK_N, CW]. With rows
# second ([BLOCK_M, BLOCK_N, NB, CW]) Triton 3.6 put the word load's warps on the sub-chunks, and every row step
# summed across warps through shared memory (16 x 256 x 4 warps, bm=1: 3 bar.sync a step). Now the lanes cover
# NB and CW first and the warps the rows when BLOCK_N leaves room for them (Triton 3.6 TTGIR, `ci/sass_count.py
# --dump`): 32 x 128 x 4 warps, bm=1: warpsPerCTA [1, 1, 4, 1], 2 bar.sync a step (the store's layout), row loop
# 213 SASS instructions for 32 weights a thread, 64 registers. The long-K and M=2 tiles (8 x 1024, 16 x 512) keep
# 4 bar.sync a step: the absmax load, contiguous along NB at blocksize 64, gets a layout of its own (Triton 3.9
# lays all three tiles out differently again). H100, bf16, nf4 nested bs64, CUDA graphs, both layouts over 16 tiles
# in one call (ci/linear4bit_gemv2_sweep.py, logs docs/gpu-runs/logs/20261123T2315Z-nvidia-h100-gemv2-sweep-
# {old,new}.txt; the old layout's run stopped at its 170 s limit before 8192 x 28672 M=2): best tile per shape M=1
# old -> new 10.17 -> 9.91 us (4096 x 4096), 13.64 -> 12.77, 25.97 -> 24.05, 25.91 -> 24.65 (14336 x 4096),
# 47.52 -> 43.30, 91.19 -> 78.85 (8192 x 28672); M=2 4-10% faster. The tiles below are that sweep's: M=1
# BLOCK_N=32 BLOCK_K=128 up to K=4096 (within 1.7% of each shape's best there), 8 x 1024 above when 1024 divides K
# (within 2%; other long K keep 32 x 128: 8 x 1024 halved by effective_bk was not timed); M=2 16 x 512 with 4
# programs an SM (within 1% everywhere). x takes 8 * BLOCK_M fp32 registers per word a thread holds
# (BLOCK_N * BLOCK_K / 8 / (32 * warps) words: 4 for 32 x 128 x 4, 8 for 16 x 512 x 4, whose bm=2 launch has 128
# registers under Triton 3.6), so bm <= 4 (bm=8 spills).
HEURISTIC_GEMV2 = {1: (32, 128, 4), 2: (16, 512, 4), 4: (8, 256, 4)}  # bm: (BLOCK_N, BLOCK_K, warps)
HEURISTIC_GEMV2_LONG_K = 4096  # bm=1 above this K (a multiple of the tile's BLOCK_K) takes the next tile
HEURISTIC_GEMV2_LONG_K_TILE = (8, 1024, 4)
GEMV2_PROGRAMS_PER_SM = 8  # row ranges: programs ~ 8 per SM over (row ranges x K chunks x M blocks)
HEURISTIC_GEMV2_PER_SM = {1: 8, 2: 4, 4: 8}  # the heuristic's programs an SM, by bm (the sweep's best)
# NOTE: PREFETCH: a gemv2 program loads the next row step's words and absmax before it decodes the current one
# (registers double-buffered by hand; the row loop has no other independent loads to hide their latency). Same
# products in the same order (outputs torch.equal). Timed on an H100 with the table's configs, off / on, CUDA
# graphs (ci/linear4bit_prefetch_probe.py, log docs/gpu-runs/logs/20261123T2026Z-nvidia-h100-linear4bit-prefetch-
# probe.txt): M=4 1.07-1.11x faster at (K, N) = (4096, 14336), (14336, 4096), (8192, 28672), M=2 1.02-1.05x there;
# M=1 0.98-1.03x (noise) and 4096x4096 M=2/4 0.96-0.98x. So: on in the table's M=2/4 entries of those shapes and
# in the heuristic from M=2, off (this default) elsewhere; the tuner times both from M=2.
GEMV2_PREFETCH = False


def gemv2_rows(m_blocks: int, n: int, k_chunks: int, bn: int, sms: int, per_sm: int = GEMV2_PROGRAMS_PER_SM) -> int:
    """Rows of W per gemv2 program (a multiple of BLOCK_N): about `per_sm` programs per SM."""
    ranges = max(1, per_sm * sms // max(1, m_blocks * k_chunks))
    return max(bn, triton.cdiv(triton.cdiv(n, ranges), bn) * bn)


# NOTE: the tensor-core gemm (W the dot's left operand, words decoded in PTX), H100, bf16, CUDA graphs
# (ci/linear4bit_gemm_probe.py; logs docs/gpu-runs/logs/20261123T2115Z-nvidia-h100-linear4bit-gemm-probe.txt and
# 20261123T2145Z-…): its time hardly moves with M up to 32 (the decode is per weight, the products are the tensor
# cores'). 4096 x 4096: M=1 11.6 us vs gemv2 10.7, M=2 12.2 vs 11.9, M=4 12.3 vs 18.3. (K, N) = (4096, 14336) /
# (14336, 4096), best tile: M=4-16 33.3-34.2 / 31.0-31.6 us (bnb 66-67 / 73-126, dense bf16 41.6-42.2 / 44.6-45.4),
# M=32 36.9 / 33.9, M=64 49.8 / 50.4, M=128 58.5 / 55.1 (dequantize + cuBLAS 99.2 / 106.0), M=256 110.7 / 94.7
# (dequantize + cuBLAS 105.8 / 112.1: a split decision, so dequantize + cuBLAS above M=128). The best tiles:
# BLOCK_N=64 for N >= 8192 (128 below) up to BLOCK_M=32, split-K to ~4 programs an SM there, ~2 above; BLOCK_K=64
# at BLOCK_M=32 for K >= 8192 below N=8192 (128 took 43.1 us at (14336, 4096) M=32, bench 20261123T220535Z; 64
# with 16 splits 33.9-34.0 us; at K=4096 the 128 of the bench is within 5% of the probe's best); BLOCK_M=64:
# 128 x 128 x 8 warps; BLOCK_M=128 (M=65-128): 64 x 128 x 4 warps. gemv2 keeps M <= 2.
HEURISTIC_GEMM = {16: (128, 128, 4), 32: (128, 128, 4), 64: (128, 128, 8), 128: (64, 128, 4)}  # bm: (BN, BK, warps)
HEURISTIC_GEMM_MAX_M = 128
# NOTE: at (14336, 4096) M=32 the 4-wave rule asks BLOCK_K=64 for 32 splits: 81.6 us, the workspace's traffic
# (S * M * N * 8 bytes) above the packed weight's; 16 splits took 34.0 us (log 20261123T2230Z-…-gemm-probe-m32.txt)
HEURISTIC_GEMM_MAX_SPLIT = 16


def heuristic_gemm_config(m: int, n: int, k: int, sms: int) -> dict:
    bm = max(16, bucket(m))
    bn, bk, warps = HEURISTIC_GEMM[bm]
    if bm <= 32 and n >= 8192:
        bn = 64
    elif bm == 32 and k >= 8192:
        bk = 64
    split = _split_for(triton.cdiv(m, bm) * triton.cdiv(n, bn), k, bk, sms, waves=4 if bm <= 32 else 2)
    return {"path": "gemm", "bm": bm, "bn": bn, "bk": bk, "warps": warps, "stages": 3,
            "split_k": min(split, HEURISTIC_GEMM_MAX_SPLIT)}  # fmt: skip


# NOTE: the "mma" kernel (linear_4bit_mma: per-block tables in each thread, byte-permute decode, mma.sync), H100, bf16,
# nf4 nested bs64, CUDA graphs, against the op's paths of the time (gemv2 at M=1, the table's gemm / gemv2 at M=4)
# and bnb.matmul_4bit in one run (ci/linear4bit_mma_probe.py, log docs/gpu-runs/logs/20261124T1005Z-nvidia-h100-
# mma-probe.txt): M=1 1.10-1.18x faster than gemv2 (8192 x 28672: 68.4 vs 80.5 us, bnb 98.6), M=4 1.39-1.66x
# faster than the table's entries (4096 x 14336: 22.1 vs 33.5 us, bnb 64.4; 8192 x 28672: 73.1 vs 121.2, bnb
# 347.9). 4 warps with 8 K splits was within 2.4% of each shape's best at M=1 and M=4. At M=16 (two n tiles) it
# took 1.12-1.24x the gemm's time (x is re-read by every lane group from L1: 4x the line accesses of M=4), so the
# heuristic kept it to M <= 8 then. The tables' M=4/8/16 keys and three of their M=32 keys name it (retuned with it on
# both GPUs); a problem mma_ok refuses there (fp16 x with a bf16 W, K not a multiple of 256, a torch.compile trace)
# takes heuristic_config(mma=False), not the tuned gemm entry those keys held before.
# Session 21: with the n tiles a tensor dimension and x read from its lane-order copy above M = 8 (mma4's NOTE), M = 16
# took 0.69-0.93x the gemm's time (the copy included) at every issue shape with N > 2048, the one-launch 4 warps / 4 K
# warps config within 6.1% of each shape's best (ci/linear4bit_mma_probe.py, log docs/gpu-runs/logs/20261124T1826Z-
# nvidia-h100-mma-ntiles-probe.txt: 4096 x 14336 27.6 against 34.1 us, 8192 x 28672 87.0 against 126.2); M = 32
# 0.82-1.11x and M = 64 1.31-1.79x (four and eight n tiles: x's loads from L2 with few warps a scheduler), so the
# heuristic stops at M = 16 and the tables may name it up to M = 32 (tune.MMA_TUNE_MAX_M). N <= 2048 at M > 8 was not
# measured: it keeps the gemm.
MMA_MAX_M = 16


# NOTE: one launch where it measured as fast (session 20). An mma config with one K split whose program's warps
# split K (`kwarps`) launches one kernel and allocates no workspace: an eager call took 15.8-16.4 us back to back
# against 25.4-26.2 us for 4 warps x 8 splits where the GPU time is small (H100, bf16, 4096 x 4096 and 4096 x 1024,
# M = 1 to 16; ci/linear4bit_mma_probe.py --eager, log docs/gpu-runs/logs/20261124T1616Z-nvidia-h100-mma-kwarps-
# probe.txt). HEURISTIC_MMA takes, per M bucket and N range, that probe's best one-launch config where its CUDA-graph
# time was within 3% of the best two-launch one at the probe's shapes (the tuner's rule, LINEAR_4BIT_TIE in
# tritonbits_harness.tune), else session 17's 4 warps x 8 splits: N <= 2048 (4096 x 1024: every one-launch config
# 1.09-1.12x the 8-split one: too few 16-row groups), M <= 2 at 4096 x 14336 (4 K warps 1.06x) and M = 4 at N = 28672
# (4 K warps 1.04-1.09x). Against each case's best config: M = 1 1.00-1.02x at 4096 x 4096, 14336 x 4096, 4096 x
# 28672 and 8192 x 28672, 1.00x / 1.04x (two launches) at 4096 x 14336 / 4096 x 1024; M = 8 1.00-1.03x at five
# shapes, 1.00x at 4096 x 1024 (two launches). The tables name their own configs at their M = 4 / 8 keys.
_SPLIT8 = {"warps": 4, "split_k": 8}
HEURISTIC_MMA = {  # M bucket: ((largest N, config), ...)
    1: ((2048, _SPLIT8), (8192, {"warps": 8, "kwarps": 8}), (16384, _SPLIT8), (1 << 62, {"warps": 4, "kwarps": 4})),
    4: ((2048, _SPLIT8), (8192, {"warps": 8, "kwarps": 8}), (16384, {"warps": 2, "kwarps": 2}), (1 << 62, _SPLIT8)),
    8: ((2048, _SPLIT8), (8192, {"warps": 8, "kwarps": 8}), (16384, {"warps": 2, "kwarps": 2}),
        (1 << 62, {"warps": 2, "kwarps": 1})),
    16: ((2048, None), (1 << 62, {"warps": 4, "kwarps": 4})),  # None: not mma (the NOTE on MMA_MAX_M)
}  # fmt: skip


def heuristic_mma_config(m: int, n: int, k: int) -> dict | None:
    """HEURISTIC_MMA's config for M's bucket (M <= 2 takes M = 1's) and N (None where it names no mma config);
    splits capped at K's segments / 2."""
    rows = HEURISTIC_MMA[max(1, min(bucket(m), MMA_MAX_M)) if m > 2 else 1]
    tile = next(cfg for largest, cfg in rows if n <= largest)
    if tile is None:
        return None
    split = max(1, min(tile.get("split_k", 1), k // (2 * mma4.SEGMENT)))
    return {"path": "mma", "warps": tile["warps"], "split_k": split, "kwarps": tile.get("kwarps", 1), "prefetch": True}


def _pow2_int(v) -> bool:
    return type(v) is int and v >= 1 and v & (v - 1) == 0


def mma_splits(cfg: dict, k: int) -> tuple[int, int]:
    """(splits, 256-column segments a split) of an mma config on K (a short last split where they do not divide)."""
    segs = k // mma4.SEGMENT
    per_split = triton.cdiv(segs, max(1, min(cfg.get("split_k", 1), segs)))
    return triton.cdiv(segs, per_split), per_split


def launch_count(cfg: dict, m: int, n: int, k: int) -> int:
    """Kernels one call launches with this config (no fallback applied): the fused kernel, plus the split-K
    reduction where it splits K, plus the mma's lane-order copy of x above DIRECT_MAX_M and the wgmma's copy of x;
    dequantize + matmul: two."""
    path = cfg.get("path")
    if path == "mma":  # K under one segment: mma_ok refuses it, and so does launch_count's arithmetic
        return (1 if k >= mma4.SEGMENT and mma_splits(cfg, k)[0] == 1 else 2) + (m > mma4.DIRECT_MAX_M)
    if path == "wgmma":  # x's copy, the kernel, and the reduction where it splits K
        return 2 + (k >= wg4.SEGMENT and mma_splits(cfg, k)[0] > 1)
    if path not in ("gemv", "gemv2", "gemm") or not fused_ok(cfg, k):
        return 2
    bk = effective_bk(cfg, k)
    splits = k // bk if path == "gemv2" else _splits(cfg, k, bk)[0]
    return 1 if splits == 1 else 2


# NOTE: the wgmma kernel (linear_4bit_wgmma), H100, bf16, nf4 nested bs64, CUDA graphs, x's copy included
# (ci/linear4bit_wgmma_probe.py, log docs/gpu-runs/logs/20261124T2203Z-nvidia-h100-wgmma-probe.txt; every config first
# checked against the K-aware policy): at the six issue shapes its best config took 0.78-0.86x the op's time of the
# day at M = 32 (mma / gemm), 0.63-0.87x at M = 64 and 0.69-0.76x at M = 128 (the gemm), 0.66-0.87x at M = 256
# (dequantize + cuBLAS); 4096 x 14336: 27.8 / 32.7 / 40.5 / 78.1 us at M = 32 / 64 / 128 / 256 (the op 35.7 / 51.0 /
# 58.8 / 105.5, dense bf16 44.0 / 44.2 / 45.9 / 50.9). Best configs: BLOCK_M = M up to M = 64, mostly with one
# warpgroup (64 W rows a program; two at 3 of those 12 cases, within 0.7-2.3% with one: 4096 x 4096 at M = 32 and
# 64, 4096 x 28672 at M = 64), two warpgroups with BLOCK_M = 128 above; asynchronous products as fast as
# synchronous ones or faster at most points. HEURISTIC_WGMMA_TARGET: splits (a power of two, at most 4) until the
# programs reach
# it: 512 up to M = 64 (4096 x 28672 M = 32: 448 programs, 2 splits 45.7 us against 49.0 for one), 96 above (4096 x
# 6144 M = 128: 48 programs, 2 splits 25.5 against 30.2 for 4; 4096 x 14336 M = 128: 112 programs, one split 40.5
# against 49.2 for 2). At the probe's 24 cases the rule's config takes 1.00-1.08x the best config's time (the H100
# table names the best ones at those keys). The H200 (same probe, log docs/gpu-runs/logs/20261124T2232Z-nvidia-h200-
# wgmma-probe.txt; 22 of the 24 cases before its time limit): the rule within 0.999-1.019x of the best config at all
# 22, the best config 1.13-1.57x faster than the H200 table's gemm / mma entries of the time at M = 32..128 (its
# table now names the best configs at those 22 keys; (8192, 28672) M = 128 keeps its gemm entry). At M = 256 the
# H200's dequantize + cuBLAS took 26.0 / 39.3 us at 4096 x 4096 / 6144 (bench 20261124T203350Z / 203524Z) where the
# wgmma kernel took 27.2 / 40.2 (bench 20261124T223952Z / 224117Z; in that run's own dequantize + F.linear rows 26.8
# / 40.8), and in one run with that table 26.0 / 38.9 against the wgmma's best 26.7 / 40.0 (log docs/gpu-runs/logs/
# 20261124T2246Z-nvidia-h200-wgmma-probe-m256.txt): the H200 table names dequantize there (at 4096 x 6144 the runs
# disagree by 1-3%: a tie). Session 24 (the sub-tile pipeline and BLOCK_M = 256, linear_4bit_wgmma's module doc; logs
# docs/gpu-runs/logs/20261125T0015Z-nvidia-h100-wgmma-hybrid-probe.txt and 20261125T0030Z-nvidia-h200-wgmma-hybrid-
# probe.txt, M = 128 / 256 at the six shapes): above M = 128 the rule takes BLOCK_M = 256 with two warpgroups (each
# weight decoded once; 0.73-0.89x the best config of session 23's kernel at the four larger shapes on both GPUs); at
# those 24 cases the rule's config took 1.00-1.06x the best config's time (1.057 / 1.035 at 4096 x 4096 M = 256, where
# BLOCK_M = 128 with one warpgroup and one split was best; 1.055 / 1.038 at 14336 x 4096 M = 128), and both tables name
# the best ones at those keys (the H200's (4096, 4096) M = 256 key dequantize + cuBLAS, 26.6 us against the wgmma
# kernel's 26.3 in that probe and 26.9 against 28.4 in the bench record 20261125T003727Z: a tie). N <= 2048 was not
# measured: the rule stays above WGMMA_MIN_N.
HEURISTIC_WGMMA_TARGET = {64: 512, 256: 96}  # largest M bucket: programs to reach by splitting K
HEURISTIC_WGMMA_MAX_SPLIT = 4
WGMMA_MIN_N = 2048  # the heuristic's wgmma above this N only (NOTE: smaller N not measured)


def heuristic_wgmma_config(m: int, n: int, k: int) -> dict:
    """The NOTE's rule: BLOCK_M = max(32, M's bucket) with one warpgroup up to M = 64, else with two; K split
    until the programs reach HEURISTIC_WGMMA_TARGET (at most HEURISTIC_WGMMA_MAX_SPLIT, and K's segments / 2)."""
    bm_bucket = max(32, bucket(m))
    bm, wg = (bm_bucket, 1) if bm_bucket <= 64 else (bm_bucket, 2)
    target = next(t for largest, t in sorted(HEURISTIC_WGMMA_TARGET.items()) if bm_bucket <= largest)
    programs = triton.cdiv(n, 64 * wg) * triton.cdiv(m, bm)
    split = 1
    while split < HEURISTIC_WGMMA_MAX_SPLIT and programs * split < target:
        split *= 2
    split = max(1, min(split, k // (2 * wg4.SEGMENT)))
    return {"path": "wgmma", "bm": bm, "wg": wg, "split_k": split, "async": True}


def heuristic_config(x_dtype: torch.dtype, m: int, n: int, k: int, sms: int, mma: bool = True,
                     wgmma: bool = False) -> dict:  # fmt: skip
    """For keys the GPU family's table lacks: the mma kernel up to MMA_MAX_M for 16-bit x (where `mma_ok` takes
    the problem: else `aligned_config` asks again with mma=False), with wgmma (an sm90 device: `config_for`) the
    wgmma kernel at M = wg4.MIN_M..wg4.MAX_M (where `wgmma_ok` refuses the problem `aligned_config` asks again
    without it), gemv2 up to M=2 (see its NOTE), the tensor-core gemm up to HEURISTIC_GEMM_MAX_M, dequantize +
    cuBLAS above. fp32 x: gemv2 up to M=4, then dequantize + cuBLAS (the gemm's fp32 dot is not a tensor-core
    one)."""
    wide = x_dtype == torch.float32
    if mma and not wide and m <= MMA_MAX_M and k % mma4.SEGMENT == 0:
        cfg = heuristic_mma_config(m, n, k)
        if cfg is not None:
            return cfg
    if wgmma and not wide and wg4.MIN_M <= m <= wg4.MAX_M and n > WGMMA_MIN_N and k % wg4.SEGMENT == 0:
        return heuristic_wgmma_config(m, n, k)
    if m > (4 if wide else 2):
        return heuristic_gemm_config(m, n, k, sms) if not wide and m <= HEURISTIC_GEMM_MAX_M else {"path": "dequant"}
    bm = bucket(m)
    long_k = bm == 1 and k > HEURISTIC_GEMV2_LONG_K and k % HEURISTIC_GEMV2_LONG_K_TILE[1] == 0
    bn, bk, warps = HEURISTIC_GEMV2_LONG_K_TILE if long_k else HEURISTIC_GEMV2[bm]
    return {"path": "gemv2", "bm": bm, "bn": bn, "bk": bk, "warps": warps, "stages": 1, "prefetch": bm >= 2,
            "per_sm": HEURISTIC_GEMV2_PER_SM[bm]}  # fmt: skip


def heuristic_gemv_config(x_dtype: torch.dtype, m: int, n: int, k: int, sms: int) -> dict:
    """The H100 sweep's best gemv tiles (M <= 4; split-K scaled to the grid): gemv2's fallback where the packed
    bytes cannot be read as int32 words."""
    bm = bucket(min(m, 4))
    bn, bk, warps, split = HEURISTIC_GEMV[bm]
    split = min(split, _split_for(triton.cdiv(n, bn), k, bk, sms)) if bm == 1 else split
    return {"path": "gemv", "bm": bm, "bn": bn, "bk": bk, "warps": warps, "stages": 3, "pair": False,
            "split_k": max(split, 1)}  # fmt: skip


@functools.lru_cache(maxsize=4096)  # keyed by bucket: bounded by families x keys
def _tuned(device: torch.device, key: str) -> dict | None:
    return configs.lookup("linear_4bit", device, key)


def config_for(device: torch.device, x_dtype: torch.dtype, m: int, n: int, k: int) -> dict:
    """The tuned config of this problem's bucket on device's GPU family, else `heuristic_config` (with the wgmma
    kernel where the device has it)."""
    return _tuned(device, config_key(x_dtype, m, n, k)) or heuristic_config(
        x_dtype, m, n, k, _sm_count(device), wgmma=wgmma_device(device)
    )


@functools.cache
def wgmma_device(device: torch.device) -> bool:
    """Whether device runs the wgmma kernel: CUDA sm90 (Hopper: wgmma is sm90a's) with the Triton it ran on."""
    return bool(
        wg4.AVAILABLE
        and device.type == "cuda"
        and not _runtime.INTERPRET
        and torch.cuda.get_device_capability(device) == (9, 0)
    )  # fmt: skip


@functools.cache
def pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """int64[256]: entry b holds the fp32 bits of code[b >> 4] in its low word and of code[b & 15] in its high
    word (one 8-byte gather decodes a byte)."""
    bits = formats.code_values(quant_type).to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = torch.arange(256)
    return (bits[b >> 4] | (bits[b & 15] << 32)).to(device)


# ---------------------------------------------------------------------------------------------------
# Launch.


MIN_BK = 32  # the smallest K chunk a fused kernel takes (the gemm's dot needs 16)


def effective_bk(cfg: dict, k: int) -> int:
    """BLOCK_K for this K: the config's, halved until it divides K; 0 when nothing >= MIN_BK does. (Every fused
    kernel splits a chunk into per-quantization-block sub-chunks: any blocksize works.)"""
    bk = cfg["bk"]
    while k % bk and bk > MIN_BK:
        bk //= 2
    return bk if k % bk == 0 and bk >= MIN_BK else 0


def fused_ok(cfg: dict, k: int) -> bool:
    """Whether a fused kernel takes this problem (else dequantize + matmul): a gemv/gemv2/gemm config and a K
    chunk (a power of two >= MIN_BK dividing K: whole int32 words per row for gemv2 and the gemm). K = 0 never: an
    empty K takes F.linear's zeros (+ bias) (gemv2 left its output unwritten there, seen under the interpreter)."""
    if k == 0:
        return False
    if cfg.get("path") in ("mma", "wgmma"):
        return True  # aligned_config keeps it only where mma_ok / wgmma_ok
    if cfg.get("path") in ("gemv2", "gemm") and k % 8:
        return False
    return cfg.get("path") in ("gemv", "gemv2", "gemm") and effective_bk(cfg, k) > 0


def aligned_config(cfg: dict, w: PreparedWeight, x_dtype: torch.dtype, m: int, n: int, k: int,
                   device: torch.device, x2: torch.Tensor | None = None) -> dict:  # fmt: skip
    """cfg, unless it reads the packed bytes as int32 words (gemv2, gemm) and they are not 4-byte aligned: then
    the gemv up to M=4, dequantize + matmul above (the gemv re-reads W for every 4 rows of x). An "mma" config
    where `mma_ok` refuses the problem (or no x2 is given) takes heuristic_config instead; so does a "wgmma" config
    where `wgmma_ok` refuses it."""
    if cfg.get("path") == "wgmma":
        check_wgmma_config(cfg)  # on every machine, before a refusal replaces it
        if x2 is None or not wgmma_ok(w, x2, device):
            cfg = heuristic_config(x_dtype, m, n, k, _sm_count(device))
    if cfg.get("path") == "mma" and (x2 is None or not mma_ok(w, x2, device)):
        cfg = heuristic_config(x_dtype, m, n, k, _sm_count(device), mma=False)
    if cfg.get("path") in ("gemv2", "gemm") and words_of(w) is None:
        return heuristic_gemv_config(x_dtype, m, n, k, _sm_count(device)) if m <= 4 else {"path": "dequant"}
    return cfg


def words_of(w: PreparedWeight) -> torch.Tensor | None:
    """The packed bytes as int32 words (gemv2, gemm), or None where they are not 4-byte aligned: by address; for a
    traced tensor (a triton_op's body under torch.compile: fake, no address) by its storage offset, the
    storage taken as allocated aligned."""
    flat = w.A.reshape(-1)
    aligned = _runtime.address_aligned(flat, 4)
    if aligned is None:
        aligned = bool(flat.storage_offset() % 4 == 0)
    if not aligned or flat.numel() % 4 or not flat.is_contiguous():
        return None
    return flat.view(torch.int32)


def mma_problem_ok(w: PreparedWeight, x2: torch.Tensor) -> bool:
    """The problems the "mma" kernel's contract covers, whatever the machine: 1 <= M <= 64 and `table_decode_ok`;
    above DIRECT_MAX_M, M K < 2^32 (the lane-order copy's int32 offsets)."""
    m, k = x2.shape
    return bool(
        1 <= m <= mma4.MAX_M
        and (m <= mma4.DIRECT_MAX_M or m * k < 2**32)  # the lane-order copy's int32 offsets (pairs: M K / 2)
        and table_decode_ok(w, x2)
    )  # fmt: skip


def wgmma_problem_ok(w: PreparedWeight, x2: torch.Tensor) -> bool:
    """The problems the "wgmma" kernel's contract covers, whatever the machine: M >= 1 and `table_decode_ok` (its
    copy of x and its own offsets are int64)."""
    return bool(x2.shape[0] >= 1 and table_decode_ok(w, x2))


def table_decode_ok(w: PreparedWeight, x2: torch.Tensor) -> bool:
    """What the mma and wgmma kernels' decode and x reads need: K > 0 a multiple of 256 and of the blocksize, a
    blocksize that is a multiple of 64, x and W both fp16 or both bf16, W readable as int32 words, and x readable
    as 4-byte pairs: 16-byte aligned (the plans' key records that), contiguous along K, an even row stride."""
    m, k = x2.shape
    state = w.state
    return bool(
        k > 0
        and k % mma4.SEGMENT == 0
        and state.blocksize % 64 == 0
        and k % state.blocksize == 0
        and x2.dtype == state.dtype
        and x2.dtype in (torch.float16, torch.bfloat16)
        and (x2.stride(1) == 1 and (m == 1 or x2.stride(0) % 2 == 0))
        and _runtime.address_aligned(x2, 16)
        and words_of(w) is not None
    )  # fmt: skip


def mma_ok(w: PreparedWeight, x2: torch.Tensor, device: torch.device) -> bool:
    """Whether the "mma" kernel (linear_4bit_mma) runs this problem: a Triton its Gluon kernel ran on
    (mma4.AVAILABLE), CUDA sm80+ (not the interpreter), and `mma_problem_ok`."""
    return bool(
        mma4.AVAILABLE
        and device.type == "cuda"
        and not _runtime.INTERPRET
        and _runtime.native_bf16_conversion(device)
        and mma_problem_ok(w, x2)
    )  # fmt: skip


def wgmma_ok(w: PreparedWeight, x2: torch.Tensor, device: torch.device) -> bool:
    """Whether the "wgmma" kernel (linear_4bit_wgmma) runs this problem: `wgmma_device` and `wgmma_problem_ok`."""
    return bool(wgmma_device(device) and wgmma_problem_ok(w, x2))


def _dot_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype, device: torch.device) -> int:
    """The gemm's operand dtype code: x's and W's 16-bit dtype where they agree (products exact in the fp32
    accumulator), else fp32 with input_precision="ieee" (no TF32); fp32 under the interpreter (its dot has no
    bf16 arithmetic) and for bf16 below sm80 (no bf16 tensor cores)."""
    native = x_dtype != torch.bfloat16 or _runtime.native_bf16_conversion(device)
    if x_dtype == w_dtype and x_dtype != torch.float32 and native and not _runtime.INTERPRET:
        return _W_CODE[x_dtype]
    return 0


class Launch(NamedTuple):
    """One kernel launch on validated arguments. `slots`: (position in args, name) of each argument that is a
    per-call tensor ("x", "bias", "out", "out16": out's int16 view, "ws": the split-K workspace, "wd", "wd16":
    the dequantized weight buffer and its int16 view, "xl": the mma path's lane-order copy of x, or the wgmma
    path's copy), which the eager plans pass anew on every call."""

    fn: Any
    grid: tuple[int, int, int]
    args: tuple
    constexprs: dict
    options: dict
    slots: tuple[tuple[int, str], ...]


def launch_fused(x2, w: PreparedWeight, bias, out, cfg: dict, *, kernel_wrap=None, use_asm: bool | None = None) -> None:
    """Launch the gemv, gemv2 or gemm kernel (and the split-K reduction) on a validated x2 [M, K] and prepared
    weight. kernel_wrap: torch.library.wrap_triton under a triton_op."""
    m = x2.shape[0]
    if m == 0 or w.state.shape[0] == 0:
        return
    use_asm = USE_ASM_DEFAULT if use_asm is None else use_asm
    if use_asm and _runtime.INTERPRET:
        raise ValueError("use_asm=True needs a GPU: the Triton interpreter cannot run inline PTX")
    if kernel_wrap is not None and cfg.get("path") in ("mma", "wgmma"):
        raise ValueError(f"launch_fused: the {cfg['path']} path is a Gluon kernel, which wrap_triton cannot take "
                         "(forward_2d takes the heuristic's other paths under a triton_op)")  # fmt: skip
    launches, _ws = fused_launches(x2, w, bias, out, cfg, use_asm)
    for launch in launches:
        _launch(launch, x2.device, kernel_wrap, use_asm)


def fused_launches(
    x2, w: PreparedWeight, bias, out, cfg: dict, use_asm: bool
) -> tuple[list[Launch], torch.Tensor | None]:
    """The launches of a fused path (M, N > 0; `fused_ok`), and the split-K workspace they use (allocated
    here), without launching anything."""
    m, k = x2.shape
    state = w.state
    n = state.shape[0]
    device = x2.device
    cfg = aligned_config(cfg, w, x2.dtype, m, n, k, device, x2)
    if not fused_ok(cfg, k):
        raise ValueError(f"fused_launches: {cfg} is not a fused config for K={k} and this weight")
    if cfg["path"] == "mma":
        return _mma_launches(x2, w, bias, out, cfg)
    if cfg["path"] == "wgmma":
        return _wgmma_launches(x2, w, bias, out, cfg)
    bk = effective_bk(cfg, k)
    if cfg["path"] in ("gemv2", "gemm"):
        words = words_of(w)
        assert words is not None  # aligned_config
        word_launches = _gemv2_launches if cfg["path"] == "gemv2" else _gemm_launches
        return word_launches(x2, w, words, bias, out, cfg, bk, use_asm)
    bm, bn = cfg["bm"], cfg["bn"]
    split, k_per_split = _splits(cfg, k, bk)
    manual_bf16 = not _runtime.native_bf16_conversion(device)
    out_bf16_manual = manual_bf16 and out.dtype == torch.bfloat16
    nested = w.code2 is not None
    table = (
        pair_table(state.quant_type, device) if cfg.get("pair", True) else formats.code_table(state.quant_type, device)
    )
    ws = torch.empty((split, m, n), dtype=torch.float32, device=device) if split > 1 else None
    dst = ws if ws is not None else (out.view(torch.int16) if out_bf16_manual else out)
    dummy = w.absmax
    args = (x2, w.A, w.absmax, table, w.code2 if nested else dummy, w.absmax2 if nested else dummy,
            w.offset if nested else dummy, bias if bias is not None else dummy, dst,
            m, n, k // 2, x2.stride(0), x2.stride(1), out.stride(0), k_per_split // 2)  # fmt: skip
    constexprs = {**_shared_constexprs(x2, w, bias, ws, manual_bf16, out_bf16_manual, use_asm),
                  "PAIR": bool(cfg.get("pair", True))}  # fmt: skip
    constexprs.update({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk})
    options = {"num_warps": cfg.get("warps", 4), "num_stages": cfg.get("stages", 3)}
    if not use_asm:
        options["enable_fp_fusion"] = False
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
    slots = _fused_slots(bias, ws, out_bf16_manual)
    launches = [Launch(_linear_4bit_gemv_kernel, grid, args, constexprs, options, slots)]
    if ws is not None:
        launches.append(_reduce_launch(ws, bias, out, out_bf16_manual))
    return launches, ws


def _shared_constexprs(x2, w: PreparedWeight, bias, ws, manual_bf16: bool, out_bf16_manual: bool,
                       use_asm: bool) -> dict:  # fmt: skip
    """The constexprs every fused kernel takes: the weight's format, the bias, the conversions and the output."""
    nested = w.code2 is not None
    return {"BLOCKSIZE": w.state.blocksize, "BLOCKSIZE2": w.blocksize2 if nested else 1, "NESTED": nested,
            "HAS_BIAS": bias is not None, "W_DTYPE": _W_CODE[w.state.dtype], "MANUAL_BF16": manual_bf16,
            "OUT_MANUAL_BF16": out_bf16_manual and ws is None, "USE_ASM": use_asm,
            "FTZ": _runtime.ftz_mode(x2.device), "SPLIT": ws is not None}  # fmt: skip


def _splits(cfg: dict, k: int, bk: int) -> tuple[int, int]:
    """(splits, K columns a split): the config's split_k over K's chunks of bk columns (a short last split where
    they do not divide evenly)."""
    k_chunks = k // bk
    k_per_split = triton.cdiv(k_chunks, max(1, min(cfg.get("split_k", 1), k_chunks))) * bk
    return triton.cdiv(k, k_per_split), k_per_split


X_SLOT, BIAS_SLOT, DST_SLOT = 0, 7, 8  # the fused kernels' x, bias and out/workspace arguments


def _fused_slots(bias, ws, out_bf16_manual: bool) -> tuple[tuple[int, str], ...]:
    dst = "ws" if ws is not None else ("out16" if out_bf16_manual else "out")
    return ((X_SLOT, "x"),) + (((BIAS_SLOT, "bias"),) if bias is not None else ()) + ((DST_SLOT, dst),)


def _launch(launch: Launch, device: torch.device, kernel_wrap, use_asm: bool) -> None:
    """One launch: through the triton_op's wrapper (`kernel_wrap`), else the kernel's cached launcher."""
    if kernel_wrap is not None:
        options = dict(launch.options)
        if not use_asm and launch.fn is not _splitk_reduce_kernel:
            raise ValueError("a wrapped (triton_op) launch takes no compile options: it needs use_asm=True")
        options.pop("enable_fp_fusion", None)
        kernel_wrap(launch.fn)[launch.grid](*launch.args, **launch.constexprs, **options)
    else:
        _LAUNCHERS[launch.fn](launch.grid, launch.args, launch.constexprs, launch.options, device)


def _reduce_launch(ws, bias, out, out_bf16_manual: bool) -> Launch:
    """out = round(sum of the split partials ws [S, M, N] in split order + bias)."""
    split, m, n = ws.shape
    # NOTE: at decode M*N is small (M=1, N=4096: 4 programs of 1024), and each program's S loads run back to
    # back: 4.4 us for S=56, N=4096 on the H100 (ci/kernel_breakdown.py). Smaller blocks, down to one element a
    # thread, until the grid covers 2 programs an SM.
    block = 1024
    while block > 128 and triton.cdiv(m * n, block) < 2 * _sm_count(out.device):
        block //= 2
    r_args = (ws, bias if bias is not None else ws, out.view(torch.int16) if out_bf16_manual else out, m, n)
    r_const = {"SPLIT_K": split, "HAS_BIAS": bias is not None, "MANUAL_BF16": out_bf16_manual, "BLOCK": block}
    r_grid = (triton.cdiv(m * n, block), 1, 1)
    slots = ((0, "ws"), (1, "bias" if bias is not None else "ws"), (2, "out16" if out_bf16_manual else "out"))
    return Launch(_splitk_reduce_kernel, r_grid, r_args, r_const, {"num_warps": 4}, slots)


def _word_args(x2, w: PreparedWeight, words, bias, out, split: int, last: int,
               use_asm: bool) -> tuple[tuple, torch.Tensor | None, dict, bool]:  # fmt: skip
    """The runtime arguments gemv2 and the gemm share (`last`: gemv2's rows a program, the gemm's words a split),
    the split-K workspace (split > 1), the shared constexprs and whether out is stored through its int16 view."""
    m, k = x2.shape
    n = w.state.shape[0]
    manual_bf16 = not _runtime.native_bf16_conversion(x2.device)
    out_bf16_manual = manual_bf16 and out.dtype == torch.bfloat16
    nested = w.code2 is not None
    ws = torch.empty((split, m, n), dtype=torch.float32, device=x2.device) if split > 1 else None
    dst = ws if ws is not None else (out.view(torch.int16) if out_bf16_manual else out)
    dummy = w.absmax
    args = (x2, words, w.absmax, formats.code_table(w.state.quant_type, x2.device), w.code2 if nested else dummy,
            w.absmax2 if nested else dummy, w.offset if nested else dummy, bias if bias is not None else dummy, dst,
            m, n, k // 8, x2.stride(0), x2.stride(1), out.stride(0), last)  # fmt: skip
    shared = _shared_constexprs(x2, w, bias, ws, manual_bf16, out_bf16_manual, use_asm)
    return args, ws, shared, out_bf16_manual


def _word_launches(fn, grid: tuple, args: tuple, constexprs: dict, cfg: dict, stages: int, use_asm: bool, bias, ws,
                   out, out_bf16_manual: bool) -> tuple[list[Launch], torch.Tensor | None]:  # fmt: skip
    """The kernel's launch (the config's warps and stages, `stages` by default) and, with a workspace, the split-K
    reduction's."""
    options = {"num_warps": cfg.get("warps", 4), "num_stages": cfg.get("stages", stages)}
    if not use_asm:
        options["enable_fp_fusion"] = False
    launches = [Launch(fn, grid, args, constexprs, options, _fused_slots(bias, ws, out_bf16_manual))]
    if ws is not None:
        launches.append(_reduce_launch(ws, bias, out, out_bf16_manual))
    return launches, ws


def _gemv2_launches(x2, w: PreparedWeight, words, bias, out, cfg: dict, bk: int,
                    use_asm: bool) -> tuple[list[Launch], torch.Tensor | None]:  # fmt: skip
    """gemv2: one program per (M block, row range, K chunk of bk columns); K chunks > 1 go through the split-K
    workspace and _splitk_reduce_kernel (split order 0..S-1)."""
    m, k = x2.shape
    state = w.state
    n = state.shape[0]
    device = x2.device
    bm, bn = cfg["bm"], cfg["bn"]
    split = k // bk
    m_blocks = triton.cdiv(m, bm)
    rows = cfg.get("rows") or gemv2_rows(m_blocks, n, split, bn, _sm_count(device),
                                         cfg.get("per_sm", GEMV2_PROGRAMS_PER_SM))  # fmt: skip
    rows = triton.cdiv(rows, bn) * bn
    args, ws, shared, out_bf16_manual = _word_args(x2, w, words, bias, out, split, rows, use_asm)
    constexprs = {**shared, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                  "PREFETCH": cfg.get("prefetch", GEMV2_PREFETCH)}  # fmt: skip
    grid = (m_blocks, triton.cdiv(n, rows), split)
    return _word_launches(_linear_4bit_gemv2_kernel, grid, args, constexprs, cfg, 1, use_asm, bias, ws, out,
                          out_bf16_manual)  # fmt: skip


def _gemm_launches(x2, w: PreparedWeight, words, bias, out, cfg: dict, bk: int,
                   use_asm: bool) -> tuple[list[Launch], torch.Tensor | None]:  # fmt: skip
    """gemm: one program per (row tile, M block, K split); splits > 1 go through the split-K workspace and
    _splitk_reduce_kernel (split order 0..S-1)."""
    m, k = x2.shape
    state = w.state
    n = state.shape[0]
    device = x2.device
    bm, bn = cfg["bm"], cfg["bn"]
    split, k_per_split = _splits(cfg, k, bk)
    args, ws, shared, out_bf16_manual = _word_args(x2, w, words, bias, out, split, k_per_split // 8, use_asm)
    constexprs = {**shared, "DOT_DTYPE": _dot_dtype(x2.dtype, state.dtype, device), "BLOCK_M": bm, "BLOCK_N": bn,
                  "BLOCK_K": bk}  # fmt: skip
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), split)
    return _word_launches(_linear_4bit_gemm_kernel, grid, args, constexprs, cfg, 3, use_asm, bias, ws, out,
                          out_bf16_manual)  # fmt: skip


def _mma_launches(x2, w: PreparedWeight, bias, out, cfg: dict) -> tuple[list[Launch], torch.Tensor | None]:
    """mma (M <= 64, `mma_ok`): one program per (16 * warps / kwarps W rows, K split of whole 256-column segments);
    with kwarps > 1 the program's warps split its K range and add their partial sums in the program; splits > 1 go
    through the split-K workspace and _splitk_reduce_kernel (split order 0..S-1)."""
    m, k = x2.shape
    state = w.state
    n, bs = state.shape[0], state.blocksize
    warps = cfg.get("warps", 4)
    kwarps = cfg.get("kwarps", 1)  # of the warps, those splitting the program's K range
    if not _pow2_int(warps) or not _pow2_int(kwarps) or warps % kwarps:
        raise ValueError(f"config: an mma config's warps and kwarps must be powers of two, kwarps dividing warps, "
                         f"got {cfg}")  # fmt: skip
    segs = k // mma4.SEGMENT
    split, per_split = mma_splits(cfg, k)
    nested = w.code2 is not None
    ws = torch.empty((split, m, n), dtype=torch.float32, device=x2.device) if split > 1 else None
    dummy = w.absmax
    bf16 = state.dtype == torch.bfloat16
    lanes = m > mma4.DIRECT_MAX_M  # x through its lane-order copy (mma4's NOTE), made by the first launch
    xl = torch.empty(m * k, dtype=x2.dtype, device=x2.device) if lanes else None
    args = (xl if lanes else x2, words_of(w), w.absmax, w.code2 if nested else dummy,
            w.absmax2 if nested else dummy, w.offset if nested else dummy, bias if bias is not None else dummy,
            ws if ws is not None else out, m, n, k // 8, k // bs, *mma4.x_strides(m, x2.stride(0), lanes),
            out.stride(0), per_split * mma4.SEGMENT // 8)  # fmt: skip
    constexprs = {"BLOCKSIZE": bs, "BLOCKSIZE2": w.blocksize2 if nested else 1, "NESTED": nested,
                  "HAS_BIAS": bias is not None, "SPLIT": ws is not None, "NT": triton.next_power_of_2(-(-m // 8)),
                  "WARPS": warps,
                  # some split's segments not a multiple of the K warps: its last steps load zeros past the split
                  "KWARPS": kwarps, "MASKED": per_split % kwarps != 0 or (segs - (split - 1) * per_split) % kwarps != 0,
                  "PREFETCH": bool(cfg.get("prefetch", True)),
                  "TABLE": mma4.table_asm(formats.code_values(state.quant_type).tolist(), bf16),
                  "MMA": mma4.mma_asm(bf16)}  # fmt: skip
    slots = ((0, "xl" if lanes else "x"),) + (((6, "bias"),) if bias is not None else ()) + \
        ((7, "ws" if ws is not None else "out"),)  # fmt: skip
    grid = (triton.cdiv(n, 16 * (warps // kwarps)), split, 1)
    launches = [Launch(mma4.linear_4bit_mma_kernel, grid, args, constexprs, {"num_warps": warps}, slots)]
    if lanes:
        units = m * k // 8
        launches.insert(0, Launch(mma4._lane_order_kernel, (triton.cdiv(units, mma4.LANE_BLOCK), 1, 1),
                                  (x2, xl, m, x2.stride(0), units), {"BLOCK": mma4.LANE_BLOCK}, {"num_warps": 4},
                                  ((0, "x"), (1, "xl"))))  # fmt: skip
    if ws is not None:
        launches.append(_reduce_launch(ws, bias, out, False))
    return launches, ws


# BLOCK_M (wgmma's N): x's shared memory is 1 KB a batch row up to 64 (two segment buffers), 512 bytes from 128 (four
# sub-tile buffers: 128 KB at 256)
WGMMA_BM = (32, 64, 128, 256)
WGMMA_WG = (1, 2)  # warpgroups a program (64 W rows each)
WGMMA_KEYS = frozenset({"path", "bm", "wg", "split_k", "async"})
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension (the wgmma kernel's batch-row tiles)


def check_wgmma_config(cfg: dict) -> None:
    """A "wgmma" config's shape, checked before anything else reads it (a typo must not run another config): only
    WGMMA_KEYS, bm in WGMMA_BM and wg in WGMMA_WG (ints), async a bool, split_k an int >= 1."""
    bm, wg, asy, split_k = cfg.get("bm"), cfg.get("wg", 1), cfg.get("async", True), cfg.get("split_k", 1)
    if (set(cfg) - WGMMA_KEYS or type(bm) is not int or bm not in WGMMA_BM or type(wg) is not int
            or wg not in WGMMA_WG or type(asy) is not bool or type(split_k) is not int or split_k < 1):  # fmt: skip
        raise ValueError(f"config: a wgmma config takes only the keys {sorted(WGMMA_KEYS)}, bm in {WGMMA_BM}, wg in "
                         f"{WGMMA_WG}, async a bool and split_k an int >= 1, got {cfg}")  # fmt: skip


def _wgmma_launches(x2, w: PreparedWeight, bias, out, cfg: dict) -> tuple[list[Launch], torch.Tensor | None]:
    """wgmma (sm90, `wgmma_ok`): x's copy in the kernel's K order (_x_perm_kernel, into a per-call buffer "xl"),
    then one program per (64 wg W rows, bm batch rows, K split of whole 256-column segments); splits > 1 go through
    the split-K workspace and _splitk_reduce_kernel (split order 0..S-1)."""
    m, k = x2.shape
    state = w.state
    n, bs = state.shape[0], state.blocksize
    check_wgmma_config(cfg)
    bm, wg, asy = cfg["bm"], cfg.get("wg", 1), cfg.get("async", True)
    if triton.cdiv(m, bm) > MAX_GRID_Y:
        raise ValueError(f"config: a wgmma config with bm={bm} takes at most {MAX_GRID_Y * bm} rows of x, got {m}")
    split, per_split = mma_splits(cfg, k)
    nested = w.code2 is not None
    ws = torch.empty((split, m, n), dtype=torch.float32, device=x2.device) if split > 1 else None
    xl = torch.empty(m * k, dtype=x2.dtype, device=x2.device)
    dummy = w.absmax
    bf16 = state.dtype == torch.bfloat16
    args = (xl, words_of(w), w.absmax, w.code2 if nested else dummy, w.absmax2 if nested else dummy,
            w.offset if nested else dummy, bias if bias is not None else dummy, ws if ws is not None else out,
            m, n, k, k // 8, k // bs, out.stride(0), per_split)  # fmt: skip
    constexprs = {"BLOCKSIZE": bs, "BLOCKSIZE2": w.blocksize2 if nested else 1, "NESTED": nested,
                  "HAS_BIAS": bias is not None, "SPLIT": ws is not None, "BM": bm, "WG": wg,
                  "TABLE": mma4.table_asm(formats.code_values(state.quant_type).tolist(), bf16), "BF16": bf16,
                  "ASYNC": asy}  # fmt: skip
    slots = ((0, "xl"),) + (((6, "bias"),) if bias is not None else ()) + ((7, "ws" if ws is not None else "out"),)
    units = m * k // 2
    launches = [
        Launch(wg4._x_perm_kernel, (triton.cdiv(units, wg4.X_PERM_BLOCK), 1, 1), (x2, xl, m, x2.stride(0), k),
               {"BLOCK": wg4.X_PERM_BLOCK}, {"num_warps": 4}, ((0, "x"), (1, "xl"))),
        Launch(wg4.linear_4bit_wgmma_kernel, (triton.cdiv(n, 64 * wg), triton.cdiv(m, bm), split), args, constexprs,
               {"num_warps": 4 * wg}, slots),
    ]  # fmt: skip
    if ws is not None:
        launches.append(_reduce_launch(ws, bias, out, False))
    return launches, ws


_LAUNCHERS = {fn: CachedLauncher(fn) for fn in (_linear_4bit_gemv_kernel, _linear_4bit_gemv2_kernel,
                                                 _linear_4bit_gemm_kernel, _splitk_reduce_kernel,
                                                 mma4._lane_order_kernel)}  # fmt: skip
if mma4.linear_4bit_mma_kernel is not None:
    _LAUNCHERS[mma4.linear_4bit_mma_kernel] = CachedLauncher(mma4.linear_4bit_mma_kernel)
_LAUNCHERS[wg4._x_perm_kernel] = CachedLauncher(wg4._x_perm_kernel)
if wg4.linear_4bit_wgmma_kernel is not None:
    _LAUNCHERS[wg4.linear_4bit_wgmma_kernel] = CachedLauncher(wg4.linear_4bit_wgmma_kernel)


def matmul_dequantized(x2: torch.Tensor, wd: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x2 @ wd.T + bias in x's dtype with fp32 accumulation: cuBLAS in x's dtype when W has it (an exact
    operand), else in fp32 (fp16 x with a bf16 W, say: neither converts exactly into the other)."""
    if wd.dtype == x2.dtype and x2.device.type == "cuda":
        if bias is not None and bias.stride(0) != 1:  # else not cuBLAS's one-rounding bias epilogue: 1 ulp off
            bias = bias.contiguous()
        return torch.nn.functional.linear(x2, wd, bias)
    y = torch.nn.functional.linear(x2.float(), wd.float(), None if bias is None else bias.float())
    return y.to(x2.dtype)


def forward_2d(x2: torch.Tensor, w: PreparedWeight, bias: torch.Tensor | None, *, config: dict | None = None,
               kernel_wrap=None) -> torch.Tensor:  # fmt: skip
    """out [M, N] = x2 [M, K] @ dequant(W).T + bias on validated arguments; `config` overrides the table."""
    m, k = x2.shape
    state = w.state
    n = state.shape[0]
    cfg = config or config_for(x2.device, x2.dtype, m, n, k)
    if kernel_wrap is not None and cfg.get("path") in ("mma", "wgmma"):  # Gluon kernels: not through wrap_triton
        cfg = heuristic_config(x2.dtype, m, n, k, _sm_count(x2.device), mma=False)
    cfg = aligned_config(cfg, w, x2.dtype, m, n, k, x2.device, x2)
    if fused_ok(cfg, k):
        if bias is not None and bias.stride(0) != 1:  # the kernels read bias[n] at bias_ptr + n
            bias = bias.contiguous()
        out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
        launch_fused(x2, w, bias, out, cfg, kernel_wrap=kernel_wrap, use_asm=True if kernel_wrap else None)
        return out
    wd = torch.empty(tuple(state.shape), dtype=state.dtype, device=x2.device)
    if wd.numel():
        if kernel_wrap is not None:
            dq.launch(w.A, w.absmax, w.code2, w.absmax2, w.offset, wd, state.blocksize, w.blocksize2,
                      state.quant_type, use_asm=True, kernel=kernel_wrap(dq._dequantize_4bit_kernel))  # fmt: skip
        else:
            dq.launch_weight(w, wd)
    return matmul_dequantized(x2, wd, bias)


# ---------------------------------------------------------------------------------------------------
# Validation.


def _check_x_bias(x, bias, state: QuantState, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"x must have dtype float16, bfloat16 or float32, got {x.dtype}")
    _runtime.check_device("x", x, device)
    if len(state.shape) != 2:
        raise ValueError(f"quant_state.shape must be 2-D [N, K] (out_features, in_features), got "
                         f"{tuple(state.shape)}")  # fmt: skip
    n, k = state.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dim must be K = {k} (the weight is [{n}, {k}])")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype}; it must have x's dtype {x.dtype}")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")
        _runtime.check_device("bias", bias, device)


def _prepare(weight: torch.Tensor, quant_state) -> PreparedWeight:
    """quant_state.prepare, with the packed tensor called by this function's name for it."""
    try:
        return prepare(weight, quant_state)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        if message.startswith("A "):
            raise type(exc)("weight" + message[1:]) from None
        raise


def _resolve(weight, quant_state):
    if quant_state is None:
        quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        raise ValueError("quant_state is required, unless weight is a bitsandbytes Params4bit that carries one")
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        raise ValueError("weight requires grad; linear_4bit's 4-bit weight is frozen (QLoRA trains adapters, "
                         "not it): pass weight.detach() or a Params4bit with requires_grad=False")  # fmt: skip
    if type(weight) is not torch.Tensor and isinstance(weight, torch.nn.Parameter):
        weight = weight.data
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor (packed 4-bit) or a Params4bit, got {type(weight).__name__}")
    return weight, quant_state


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as [rows, K] (rows counted, not inferred: reshape(-1, 0) is ambiguous when K = 0)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


# ---------------------------------------------------------------------------------------------------
# Eager plans. NOTE: at decode (M = 1..16) a call's GPU time is ~10-30 us on an H100 and its host time was
# ~80 us: per call the eager path re-derived the config, the words view, the argument tuples and the
# launcher's cache key over every argument, for an answer that depends only on the prepared weight and the
# call's x/bias metadata. A plan holds that answer: the launches with their config, grid, fixed arguments and
# BoundLaunches, plus the shapes to allocate; per call only the key, the allocations and the bound launches
# remain. Plans live on the PreparedWeight (`w.launches["linear_4bit"]`, PLANS_PER_WEIGHT of them, oldest
# dropped first), so whatever makes `prepare` build a new entry (a quant-state field reassigned, another packed
# tensor, dtype, shape...) also drops them. The key holds everything `_check_x_bias` and the planning read of
# the call (x's type, dtype, shape, strides, device and 16-byte alignment; bias's presence, dtype, shape,
# strides, device and alignment; whether autograd records the call): a call whose key matches a plan's passed
# that validation with the same values, so a hit skips it; any other call is validated first. The fresh
# out/workspace tensors are taken as 16-byte aligned (a fresh allocation: what dequantize_4bit's bound launch
# takes too). Where binding is unavailable (the interpreter, a launch hook, Triton's launcher refused the
# direct call) a plan's launch goes through the kernel's CachedLauncher with the same arguments.

PLANS_PER_WEIGHT = 16
_VALUE_NAMES = ("x", "bias", "out", "out16", "ws", "wd", "wd16", "xl")  # the per-call values, in `values` order
_VALUE_INDEX = {name: i for i, name in enumerate(_VALUE_NAMES)}


def _launcher_of(fn) -> CachedLauncher:
    return dq._launcher if fn is dq._dequantize_4bit_kernel else _LAUNCHERS[fn]


class _Step:
    """One launch of a plan: fixed arguments (the per-call slots emptied: the plan keeps no call's tensors),
    the slot positions, which per-call value goes in each, and its BoundLaunch once the kernel is compiled."""

    __slots__ = ("args", "bound", "constexprs", "device", "grid", "launcher", "options", "picks", "slots")

    def __init__(self, launch: Launch, device: torch.device):
        self.launcher = _launcher_of(launch.fn)
        self.grid, self.constexprs, self.options, self.device = launch.grid, launch.constexprs, launch.options, device
        self.slots = tuple(i for i, _ in launch.slots)
        self.picks = tuple(_VALUE_INDEX[name] for _, name in launch.slots)
        args = list(launch.args)
        for i in self.slots:
            args[i] = None
        self.args = tuple(args)
        self.bound: BoundLaunch | None = None

    def __call__(self, values: tuple) -> None:
        picked = [values[i] for i in self.picks]
        bound = self.bound
        if bound is not None and bound(*picked):
            return
        args = list(self.args)
        for slot, value in zip(self.slots, picked, strict=True):
            args[slot] = value
        self.launcher(self.grid, tuple(args), self.constexprs, self.options, self.device)
        if bound is None:
            self.bound = self.launcher.bind(self.grid, tuple(args), self.constexprs, self.options, self.device,
                                            self.slots)  # fmt: skip


class _Plan:
    """Everything an eager call with one key needs besides its tensors (see the NOTE above)."""

    __slots__ = ("bias_copy", "dequant", "device", "dtype", "lanes", "out_shape", "steps", "view16", "wd_dtype",
                 "work_shape", "x2_shape")  # fmt: skip

    def __init__(self, x: torch.Tensor, bias, w: PreparedWeight):
        state = w.state
        n, k = state.shape
        device = x.device
        x2 = _flatten(x)
        m = x2.shape[0]
        self.device, self.dtype = device, x.dtype
        self.x2_shape = None if x.dim() == 2 else (m, k)  # None: x is passed as it is
        self.out_shape = (*x.shape[:-1], n)
        cfg = aligned_config(config_for(device, x.dtype, m, n, k), w, x.dtype, m, n, k, device, x2)
        self.dequant = not fused_ok(cfg, k)
        self.bias_copy = not self.dequant and bias is not None and bias.stride(0) != 1
        self.wd_dtype = state.dtype
        if self.dequant:
            wd = torch.empty(tuple(state.shape), dtype=state.dtype, device=device)
            grid, args, constexprs, options = dq.plan(w.A, w.absmax, w.code2, w.absmax2, w.offset, wd,
                                                      state.blocksize, w.blocksize2, state.quant_type)  # fmt: skip
            name = "wd" if args[dq.OUT_SLOT] is wd else "wd16"
            launches = [Launch(dq._dequantize_4bit_kernel, grid, args, constexprs, options, ((dq.OUT_SLOT, name),))]
            self.work_shape: tuple | None = tuple(state.shape)
        else:
            out = torch.empty(self.out_shape, dtype=x.dtype, device=device)
            b = bias.contiguous() if self.bias_copy else bias
            launches, ws = fused_launches(x2, w, b, out.view(m, n), cfg, USE_ASM_DEFAULT)
            self.work_shape = None if ws is None else tuple(ws.shape)
        names = {name for launch in launches for _, name in launch.slots}
        self.view16 = bool(names & {"out16", "wd16"})
        self.lanes = "xl" in names  # the mma / wgmma kernel reads x from its copy (a per-call buffer)
        self.steps = tuple(_Step(launch, device) for launch in launches)

    def run(self, x: torch.Tensor, bias) -> torch.Tensor:
        x2 = x if self.x2_shape is None else x.reshape(self.x2_shape)
        device = self.device
        if self.dequant:
            wd = torch.empty(self.work_shape or (), dtype=self.wd_dtype, device=device)  # the [N, K] buffer
            self.steps[0]((x2, bias, None, None, None, wd, wd.view(torch.int16) if self.view16 else wd, None))
            return matmul_dequantized(x2, wd, bias).reshape(self.out_shape)
        if self.bias_copy and bias is not None:
            bias = bias.contiguous()
        out = torch.empty(*self.out_shape, dtype=self.dtype, device=device)  # sizes as ints: dequant_bias's NOTE
        ws = None if self.work_shape is None else torch.empty(*self.work_shape, dtype=torch.float32, device=device)
        xl = torch.empty(x2.numel(), dtype=self.dtype, device=device) if self.lanes else None
        values = (x2, bias, out, out.view(torch.int16) if self.view16 else out, ws, None, None, xl)
        for step in self.steps:
            step(values)
        return out


def _plan_key(x, bias) -> tuple | None:
    """The plan key of a call (see the NOTE above); None where x or bias is no tensor (validation refuses it)."""
    if not isinstance(x, torch.Tensor) or not (bias is None or isinstance(bias, torch.Tensor)):
        return None
    grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    try:
        b = None if bias is None else (bias.dtype, bias.shape, bias.stride(), bias.device, bias.data_ptr() % 16 == 0)
        return (type(x), x.dtype, x.shape, x.stride(), x.device, x.data_ptr() % 16 == 0, b, grad)
    except RuntimeError:  # no strides or no storage (a sparse tensor, say): validated and run unplanned
        return None


def _plan_for(x, bias, w: PreparedWeight, key: tuple | None) -> _Plan | None:
    """The plan of a validated call, made and kept under `key`; None for an empty problem (or no key)."""
    n, k = w.state.shape
    if key is None or x.numel() == 0 or n == 0 or k == 0:
        return None
    plan = _Plan(x, bias, w)
    plans = w.launches.setdefault("linear_4bit", {})
    if len(plans) >= PLANS_PER_WEIGHT:
        with contextlib.suppress(StopIteration, KeyError, RuntimeError):  # another thread may be evicting too
            del plans[next(iter(plans))]
    plans[key] = plan
    return plan


def launches_ready(x, weight, quant_state, bias=None) -> bool:
    """Whether an eager ``linear_4bit(x, weight, quant_state, bias)`` would run only launches compiled and bound
    already: the weight's validation cached and current, the call's plan made, every step bound. A CUDA-graph
    capture can run such a call; a first call compiles and loads kernels (and may build tables), which a capture
    refuses (integrations.bitsandbytes asks this before it gives a captured product to linear_4bit). Nothing is
    validated or built here."""
    if isinstance(weight, torch.nn.Parameter):
        weight = weight.data
    if quant_state is None or not isinstance(weight, torch.Tensor):
        return False
    w = prepared_entry(weight, quant_state)
    key = _plan_key(x, bias)
    plans = None if w is None else w.launches.get("linear_4bit")
    plan = plans.get(key) if plans is not None and key is not None else None
    return plan is not None and all(step.bound is not None for step in plan.steps)


# ---------------------------------------------------------------------------------------------------
# Autograd (eager): the 4-bit weight is frozen; grads for x and bias.


def _grad_x(grad2: torch.Tensor, wd: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
    """grad [M, N] @ W [N, K] with fp32 accumulation, in x's dtype."""
    if wd.dtype == grad2.dtype and grad2.device.type == "cuda":
        return grad2 @ wd
    return (grad2.float() @ wd.float()).to(x_dtype)


class _Linear4bitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, w: PreparedWeight, plan: _Plan | None):
        ctx.w = w
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _forward(x, bias, w, plan)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.w
        n = w.state.shape[0]
        grad2 = grad.reshape(-1, n)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            wd = torch.empty(tuple(w.state.shape), dtype=w.state.dtype, device=grad.device)
            dq.launch_weight(w, wd)
            grad_x = _grad_x(grad2, wd, grad.dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_bias = grad2.float().sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None


# ---------------------------------------------------------------------------------------------------
# torch.library registration (torch.compile traces these; eager calls launch directly).


def _weight_from_fields(A, absmax, code2, absmax2, offset, blocksize, blocksize2, quant_type, n, k, w_dtype):
    state = QuantState(absmax=absmax, shape=torch.Size([n, k]), dtype=w_dtype, blocksize=blocksize,
                       quant_type=quant_type)  # fmt: skip
    return PreparedWeight(None, state, A, absmax, code2, absmax2, offset, blocksize2)


@torch.library.custom_op("tritonbits::linear_4bit", mutates_args=())
def _linear_4bit_op(
    x: torch.Tensor, A: torch.Tensor, absmax: torch.Tensor, code2: torch.Tensor | None, absmax2: torch.Tensor | None,
    offset: torch.Tensor | None, bias: torch.Tensor | None, blocksize: int, blocksize2: int, quant_type: str,
    n: int, k: int, w_dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """x: [M, K] -> [M, N]. Fields as dequantize_4bit's op takes them."""
    w = _weight_from_fields(A, absmax, code2, absmax2, offset, blocksize, blocksize2, quant_type, n, k, w_dtype)
    return forward_2d(x, w, bias)


@_linear_4bit_op.register_fake
def _(x, A, absmax, code2, absmax2, offset, bias, blocksize, blocksize2, quant_type, n, k, w_dtype):
    return x.new_empty((x.shape[0], n))


def _real_tables(quant_type: str, device: torch.device) -> None:
    """Every table the fused and dequantize paths read on `device`, built (see _runtime.outside_fake)."""
    formats.code_table(quant_type, device)
    pair_table(quant_type, device)


@torch.library.triton_op("tritonbits::linear_4bit_triton_op", mutates_args=())
def _linear_4bit_triton_op(
    x: torch.Tensor, A: torch.Tensor, absmax: torch.Tensor, code2: torch.Tensor | None, absmax2: torch.Tensor | None,
    offset: torch.Tensor | None, bias: torch.Tensor | None, blocksize: int, blocksize2: int, quant_type: str,
    n: int, k: int, w_dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """The same on CUDA as a triton_op (Inductor launches the kernels; PTX keeps the nested absmax exact)."""
    _runtime.outside_fake(_real_tables, quant_type, x.device)
    w = _weight_from_fields(A, absmax, code2, absmax2, offset, blocksize, blocksize2, quant_type, n, k, w_dtype)
    return forward_2d(x, w, bias, kernel_wrap=torch.library.wrap_triton)


def _setup_context(ctx, inputs, output):
    x, A, absmax, code2, absmax2, offset, bias, blocksize, blocksize2, quant_type, n, k, w_dtype = inputs
    ctx.save_for_backward(A, absmax, code2, absmax2, offset)
    ctx.meta = (blocksize, blocksize2, quant_type, n, k, w_dtype, bias is not None, x.dtype)


def _backward(ctx, grad):
    A, absmax, code2, absmax2, offset = ctx.saved_tensors
    blocksize, blocksize2, quant_type, n, k, w_dtype, has_bias, x_dtype = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        op = dq._dequantize_4bit_triton_op if grad.device.type == "cuda" else dq._dequantize_4bit_op
        wd = op(A, absmax, code2, absmax2, offset, blocksize, blocksize2, quant_type, [n, k], w_dtype)
        grad_x = _grad_x(grad, wd, x_dtype)
    if has_bias and ctx.needs_input_grad[6]:
        grad_bias = grad.float().sum(0).to(x_dtype)
    return grad_x, None, None, None, None, None, grad_bias, None, None, None, None, None, None


_linear_4bit_op.register_autograd(_backward, setup_context=_setup_context)
_linear_4bit_triton_op.register_autograd(_backward, setup_context=_setup_context)


def _compiled_call(x, weight, quant_state, bias) -> torch.Tensor:
    """Under torch.compile: validate on the traced values (no cache), then call a registered op."""
    state = QuantState.from_any(quant_state)
    try:
        device = validate(weight, state)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        if message.startswith("A "):
            raise type(exc)("weight" + message[1:]) from None
        raise
    _check_x_bias(x, bias, state, device)
    w = PreparedWeight.build(weight, state)
    n, k = state.shape
    op = _linear_4bit_triton_op if x.device.type == "cuda" else _linear_4bit_op
    out = op(_flatten(x), w.A, w.absmax, w.code2, w.absmax2, w.offset, bias, state.blocksize, w.blocksize2,
             state.quant_type, n, k, state.dtype)  # fmt: skip
    return out.reshape(*x.shape[:-1], n)


def linear_4bit(x: torch.Tensor, weight, quant_state=None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize_4bit(weight, quant_state).T + bias`` (F.linear's convention), fused.

    x: [..., K] float16, bfloat16 or float32, any strides; the result is [..., N] in x's dtype, accumulated in
    fp32 (the weight values are exactly dequantize_4bit's). weight: the packed 4-bit tensor (uint8 or a
    quant_storage dtype) or a bnb ``Params4bit`` (then ``quant_state`` defaults to its ``.quant_state``);
    quant_state.shape is [N, K]. bias: [N] in x's dtype, or None. Differentiable w.r.t. x and bias; the
    weight is frozen (one that requires grad is refused).

    >>> y = tritonbits.linear_4bit(x, layer.weight, bias=layer.bias)      # a bnb Linear4bit
    """
    weight, quant_state = _resolve(weight, quant_state)
    if torch.compiler.is_compiling():
        return _compiled_call(x, weight, quant_state, bias)
    w = _prepare(weight, quant_state)
    key = _plan_key(x, bias)
    plans = w.launches.get("linear_4bit")
    plan = plans.get(key) if plans is not None and key is not None else None
    if plan is None:  # a call no plan has seen: validated, then planned (see the NOTE on eager plans)
        _check_x_bias(x, bias, w.state, weight.device)
        plan = _plan_for(x, bias, w, key)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad:
        return _Linear4bitFunction.apply(x, bias, w, plan)
    return _forward(x, bias, w, plan)


def _forward(x: torch.Tensor, bias, w: PreparedWeight, plan: _Plan | None) -> torch.Tensor:
    """The eager forward of a validated call: its plan, or (no plan: an empty problem) the unplanned path."""
    if plan is not None:
        return plan.run(x, bias)
    return forward_2d(_flatten(x), w, bias).reshape(*x.shape[:-1], w.state.shape[0])

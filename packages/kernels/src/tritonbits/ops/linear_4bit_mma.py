"""linear_4bit's "mma" kernel (M <= 64, x and W both fp16 or both bf16): each block's 16 weights as a table in the
thread's registers, looked up by byte permutes straight into tensor-core operands.

The decode is the work at small M (docs/kernels/linear_4bit.md: ~6.3-6.7 SASS instructions a weight in gemv2 and
the gemm: a shuffle lookup, a flushing multiply and a rounding conversion on every weight). Here one thread owns a
whole quantization block of a row, so it builds that block's table once: entry c = to_wdtype(ftz(fl32(code[c] *
absmax))) for c = 0..15 (16 multiplies, 8 packed conversions, the entries split into a low-byte and a high-byte
plane of four registers each). A packed int32 word (8 weights) is then decoded by `prmt` byte permutes: the
nibbles' low three bits select a byte from the planes' two halves, the fourth bit picks the half, and two more
permutes pair the bytes into four 16-bit operand registers (22 instructions a word, no multiply, no conversion).
Those registers are the A operand of `mma.sync.m16n8k16` as they stand: the K order inside the tensor-core step
is a permutation of the thread's own columns, and x (the B operand) is read in the same permutation, so the
products are the weights' exact ones (fp32 accumulation, the tensor core's order).

Layout (one warp): lane = 4 g + t. A warp owns 16 W rows at a time (g and g + 8, the mma's two row halves) and a
256-column segment: lane t owns columns [64 t, 64 t + 64) of it, a block of blocksize 64 (or part of a bigger one),
so its 8 words of row g and 8 of row g + 8 each feed two mmas per n tile with its own table. The batch rows are NT
n tiles of 8 (NT = 1, 2, 4, 8: a tensor dimension, [R, 4, NT]); x's row n = 8 tile + g is tile's B operand, held
by the lanes of group g, read in place up to DIRECT_MAX_M rows and above from `lane_order`'s copy (made by
_lane_order_kernel: one 512-byte run a warp load). The K loop walks the segments of the program's split; D (the mma
accumulators: rows g, g + 8 by batch rows 8 tile + 2t, 8 tile + 2t + 1) stays in registers; splits > 1 go through
the split-K workspace as the other fused kernels do. With KWARPS > 1 (the config's `kwarps`) a program's
warps split its K range instead of each taking its own rows: warp w takes row group w mod (WARPS / KWARPS) and every
KWARPS-th segment of the split (MASKED: zeros past the split's last segment), and the K slices' partial sums are
added in the program (`_fold`, Triton's cross-warp reduction) before the bias: one split then needs no workspace
and no second launch.

GPU only (Gluon, inline PTX; no interpreter): the op uses it on CUDA sm80+ with a Triton it was run on
(`AVAILABLE`), K a multiple of 256, blocksize a multiple of 64, x contiguous along K and W's words 4-byte
aligned (linear_4bit.mma_ok). Sum order: the tensor core's inside each 16-column step;
the steps of even and of odd words in two fp32 chains, each in K order, added at the end of the split (with K
warps: each warp's chains over its own segments, then the warps' sums by a fixed cross-warp tree); then the splits
in order 0..S-1.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

try:  # Gluon: triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # pragma: no cover - the CPU toolchain has Gluon too
    gluon = gl = None

# NOTE: the Triton versions this kernel has run on (GPU tests: Triton 3.6 on the H100 and the H200; benchmarks: H100);
# Gluon is experimental and changes between releases, so any other version takes the other paths
TESTED_TRITON = ("3.6",)
AVAILABLE = gluon is not None and any(triton.__version__.startswith(v) for v in TESTED_TRITON)
SEGMENT = 256  # K columns a warp covers a step: 4 lanes x 64
MAX_M = 64  # eight n tiles of the m16n8k16 mma
# NOTE: above this M the kernel reads x from `lane_order`'s copy (one more launch). Read in place, a warp's x load
# touches 4 lines per batch row (each lane t reads its own block's columns), and from M = 16 on that costs more than
# the decode saves (session 17: 1.12-1.24x the gemm's time at M = 16); the copy makes it one 512-byte run.
DIRECT_MAX_M = 8


def lane_order(x2: torch.Tensor) -> torch.Tensor:
    """x [M, K] (K a multiple of SEGMENT, contiguous along K) -> its copy in the kernel's lane order, [K / 256, 8, M,
    4, 8]: segment s, word i, batch row n, lane t, the word's 8 elements (x[n, 256 s + 64 t + 8 i + e]), so that a
    warp's load of word i (8 batch rows by 4 lanes) is one contiguous run. The layout's definition (the tests'
    oracle); the op makes the copy with _lane_order_kernel."""
    m, k = x2.shape
    return x2.view(m, k // SEGMENT, 4, 8, 8).permute(1, 3, 0, 2, 4).contiguous()


LANE_BLOCK = 256  # 8-element units a program of _lane_order_kernel


@triton.jit
def _lane_order_kernel(x_ptr, xl_ptr, M, stride_xm, UNITS, BLOCK: tl.constexpr):
    """`lane_order` on the GPU (one launch, a bound launch in the op's plans: less host time than torch's
    permute + copy): xl's 8-element unit u (lane t, batch row n, word i, segment s, t fastest) from x[n, 256 s + 64 t
    + 8 i : + 8], 16 bytes a load and a store."""
    u = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = u < UNITS
    t = u % 4
    n = u // 4 % M
    i = u // (4 * M) % 8
    s = u // (32 * M)
    src = n.to(tl.int64) * stride_xm + (256 * s + 64 * t + 8 * i).to(tl.int64)
    e = tl.arange(0, 8)
    v = tl.load(x_ptr + src[:, None] + e[None, :], mask=ok[:, None])
    tl.store(xl_ptr + u.to(tl.int64)[:, None] * 8 + e[None, :], v, mask=ok[:, None])


def x_strides(m: int, row_stride: int, lanes: bool) -> tuple[int, int, int, int]:
    """The kernel's x_sn (in 4-byte pairs), x_st4, x_ss4, x_si4 (in 16-byte quads of pairs, so that the compiler
    sees every word's 4 pairs 16-byte aligned) for x in place (row stride in elements) or `lane_order`'s copy."""
    return (16, 1, 32 * m, 4 * m) if lanes else (row_stride // 2, 8, 32, 1)


def _f32_hex(value: float) -> str:
    return f"0f{struct.unpack('<I', struct.pack('<f', value))[0]:08X}"


def table_asm(code: list[float], bf16: bool) -> str:
    """PTX: absmax $8 -> the block's 16-entry table as byte planes, $0..$3 the low bytes of entries 0-3, 4-7, 8-11,
    12-15 and $4..$7 their high bytes; entry c = to_wdtype(ftz(fl32(code[c] * absmax))) (the code as immediates)."""
    cvt = "cvt.rn.bf16x2.f32" if bf16 else "cvt.rn.f16x2.f32"
    lines = ["{", ".reg .b32 v<16>, e<8>;"]
    lines += [f"mul.rn.ftz.f32 v{c}, $8, {_f32_hex(code[c])};" for c in range(16)]
    lines += [f"{cvt} e{j}, v{2 * j + 1}, v{2 * j};" for j in range(8)]  # entry 2j in the low half
    for p in range(4):
        lines += [
            f"prmt.b32 ${p}, e{2 * p}, e{2 * p + 1}, 0x6420;",
            f"prmt.b32 ${4 + p}, e{2 * p}, e{2 * p + 1}, 0x7531;",
        ]
    lines.append("}")
    return " ".join(lines)


def _half_lookup(sel_src: str, cx: str, sel: str, out0: str, out1: str) -> list[str]:
    """Four nibbles (selector bits 0..15 of sel_src) -> two operand registers (elements in K order)."""
    return [
        f"prmt.b32 a1, $5, $6, {sel_src};",  # low bytes, entries 0-7 (nibbles >= 8 give junk, not selected)
        f"prmt.b32 a2, $7, $8, {cx};",  # low bytes, entries 8-15 (bit 3 flipped: raw mode for those)
        f"prmt.b32 b1, $9, $10, {sel_src};",
        f"prmt.b32 b2, $11, $12, {cx};",
        f"prmt.b32 lo, a1, a2, {sel};",  # byte i from a2 where nibble i has bit 3
        f"prmt.b32 hi, b1, b2, {sel};",
        # lo/hi hold elements (1, 0, 3, 2) of the four (bnb: the high nibble is the even element)
        f"prmt.b32 {out0}, lo, hi, 0x4051;",
        f"prmt.b32 {out1}, lo, hi, 0x6273;",
    ]


def decode_asm() -> str:
    """PTX: word $4 (8 weights: byte j holds elements 2j (high nibble) and 2j + 1) and the block's planes $5..$12
    (table_asm's $0..$7) -> $0..$3 = the weight pairs (0, 1), (2, 3), (4, 5), (6, 7), the lower element in the low
    half."""
    lines = ["{", ".reg .b32 cx, sel, t, a1, a2, b1, b2, lo, hi;",
             "xor.b32 cx, $4, 0x88888888;", "shr.u32 t, $4, 1;", "and.b32 t, t, 0x44444444;",
             "or.b32 sel, t, 0x32103210;"]  # fmt: skip
    lines += _half_lookup("$4", "cx", "sel", "$0", "$1")
    lines += ["shr.u32 t, $4, 16;", "shr.u32 cx, cx, 16;", "shr.u32 sel, sel, 16;"]
    lines += _half_lookup("t", "cx", "sel", "$2", "$3")
    lines.append("}")
    return " ".join(lines)


def mma_asm(bf16: bool) -> str:
    """PTX: D ($0..$3) = A ($4..$7) B ($8, $9) + C ($10..$13), m16n8k16, fp32 accumulators."""
    t = "bf16" if bf16 else "f16"
    return (f"mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32 {{$0, $1, $2, $3}}, {{$4, $5, $6, $7}}, {{$8, $9}}, "
            "{$10, $11, $12, $13};")  # fmt: skip


_ABSMAX_ASM = "{ .reg .f32 t; mul.rn.ftz.f32 t, $1, $2; add.rn.f32 $0, t, $3; }"  # bnb's nested absmax

if gl is not None:
    _ABSMAX = gl.constexpr(_ABSMAX_ASM)
    _DECODE = gl.constexpr(decode_asm())

    @gluon.jit
    def _split8(v, L: gl.constexpr):
        """[R, 4, 8] (the 8 in one thread) -> its 8 slices [R, 4] in layout L (register renames only)."""
        e, o = v.reshape([v.shape[0], 4, 4, 2]).split()  # the even and the odd words
        v0, v2, v4, v6 = _split4(e, L)
        v1, v3, v5, v7 = _split4(o, L)
        return v0, v1, v2, v3, v4, v5, v6, v7

    @gluon.jit
    def _split4(v, L: gl.constexpr):
        """[R, 4, 4] (the 4 in one thread) -> its 4 slices [R, 4] in layout L."""
        return _split22(v.reshape([v.shape[0], 4, 2, 2]), L)

    @gluon.jit
    def _split22(v, L: gl.constexpr):
        """[..., 2, 2] (the last two dimensions in one thread) -> its 4 slices [...] (element 2a + b at [a, b]) in
        layout L (register renames only)."""
        e, o = v.split()
        v0, v2 = e.split()
        v1, v3 = o.split()
        return (
            gl.convert_layout(v0, L, assert_trivial=True),
            gl.convert_layout(v1, L, assert_trivial=True),
            gl.convert_layout(v2, L, assert_trivial=True),
            gl.convert_layout(v3, L, assert_trivial=True),
        )

    @gluon.jit
    def _load(ptr, ok, MASKED: gl.constexpr, EVICT: gl.constexpr):
        """ptr's values, zeros where not ok with MASKED (else every address is inside the split)."""
        if MASKED:
            return gl.load(ptr, mask=ok, other=0, eviction_policy=EVICT)
        else:
            return gl.load(ptr, eviction_policy=EVICT)

    @gluon.jit
    def _absmax(absmax_ptr, code2_ptr, absmax2_ptr, off, qblock, ok, BLOCKSIZE2: gl.constexpr, NESTED: gl.constexpr,
                MASKED: gl.constexpr):  # fmt: skip
        """The blocks' fp32 absmax (nested: bnb's code2[q] * absmax2 + offset; _load's zeros where not ok)."""
        if NESTED:
            q = _load(absmax_ptr + qblock, ok, MASKED, "").to(gl.int32)
            a2 = _load(absmax2_ptr + qblock // BLOCKSIZE2, ok, MASKED, "")
            return gl.inline_asm_elementwise(_ABSMAX, "=r,r,r,r", [gl.load(code2_ptr + q), a2, off],
                                             dtype=gl.float32, is_pure=True, pack=1)  # fmt: skip
        else:
            return _load(absmax_ptr + qblock, ok, MASKED, "")

    @gluon.jit
    def _table(am, TABLE: gl.constexpr):
        return gl.inline_asm_elementwise(TABLE, "=r,=r,=r,=r,=r,=r,=r,=r,r", [am],
                                         dtype=(gl.int32, gl.int32, gl.int32, gl.int32, gl.int32, gl.int32,
                                                gl.int32, gl.int32), is_pure=True, pack=1)  # fmt: skip

    @gluon.jit
    def _decode(word, tab):
        return gl.inline_asm_elementwise(_DECODE, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
                                         [word, tab[0], tab[1], tab[2], tab[3], tab[4], tab[5], tab[6], tab[7]],
                                         dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True,
                                         pack=1)  # fmt: skip

    @gluon.jit
    def _mma(a0, a1, a2, a3, b0, b1, acc, MMA: gl.constexpr):
        return gl.inline_asm_elementwise(MMA, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r",
                                         [a0, a1, a2, a3, b0, b1, acc[0], acc[1], acc[2], acc[3]],
                                         dtype=(gl.float32, gl.float32, gl.float32, gl.float32), is_pure=True,
                                         pack=1)  # fmt: skip

    @gluon.jit
    def _split_pairs(v, L: gl.constexpr):
        """[R, 4, NT, 4] (the 4 pairs in one thread) -> its 4 slices [R, 4, NT] in layout L."""
        return _split22(v.reshape([v.shape[0], 4, v.shape[2], 2, 2]), L)

    @gluon.jit
    def _x_word(x_seg, ok, i, x_si4, L: gl.constexpr, MASKED: gl.constexpr):
        """x's 8 elements of the lane's word i for each n tile, as 4 bf16/f16 pairs (int32 [R, 4, NT] each);
        _load's zeros where not ok (a step past the split, whose products are then exact zeros)."""
        return _split_pairs(_load(x_seg + 4 * (x_si4 * i), ok, MASKED, ""), L)

    @gluon.jit
    def _word_mmas(wa, wb, ta, tb, xw, acc, MMA: gl.constexpr):
        """One word of row g (wa) and of row g + 8 (wb), [R, 4] each: two mmas per n tile (x's pairs xw, the
        accumulators acc [R, 4, NT]; the word's A operand is the same for every tile)."""
        p0, p1, p2, p3 = _decode(wa, ta)
        q0, q1, q2, q3 = _decode(wb, tb)
        acc = _mma(gl.expand_dims(p0, 2), gl.expand_dims(q0, 2), gl.expand_dims(p1, 2), gl.expand_dims(q1, 2),
                   xw[0], xw[1], acc, MMA)  # fmt: skip
        return _mma(gl.expand_dims(p2, 2), gl.expand_dims(q2, 2), gl.expand_dims(p3, 2), gl.expand_dims(q3, 2),
                    xw[2], xw[3], acc, MMA)  # fmt: skip

    @gluon.jit
    def _store(acc, n0, rows, M, N, pid_s, bias_ptr, out_ptr, stride_om, HAS_BIAS: gl.constexpr,
               SPLIT: gl.constexpr):  # fmt: skip
        """acc = D[rows, n0], D[rows, n0 + 1], D[rows + 8, n0], D[rows + 8, n0 + 1] ([R, 4, NT] each): into the
        workspace [S, M, N] or, + bias, into out."""
        _store1(acc[0], n0, rows, M, N, pid_s, bias_ptr, out_ptr, stride_om, HAS_BIAS, SPLIT)
        _store1(acc[1], n0 + 1, rows, M, N, pid_s, bias_ptr, out_ptr, stride_om, HAS_BIAS, SPLIT)
        _store1(acc[2], n0, rows + 8, M, N, pid_s, bias_ptr, out_ptr, stride_om, HAS_BIAS, SPLIT)
        _store1(acc[3], n0 + 1, rows + 8, M, N, pid_s, bias_ptr, out_ptr, stride_om, HAS_BIAS, SPLIT)

    @gluon.jit
    def _store1(d, n, rows, M, N, pid_s, bias_ptr, out_ptr, stride_om, HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr):
        ok = (n < M) & (rows < N)
        if SPLIT:
            gl.store(out_ptr + (pid_s * M + n).to(gl.int64) * N + rows, d, mask=ok)
        else:
            if HAS_BIAS:
                d += gl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(gl.float32)
            gl.store(out_ptr + n.to(gl.int64) * stride_om + rows, d.to(out_ptr.dtype.element_ty), mask=ok)

    @gluon.jit
    def _seg_loads(words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, off, row_a3, row_b3, w3, qrow_a, qrow_b, t, kw3,
                   kw, kw_hi, BLOCKSIZE: gl.constexpr, BLOCKSIZE2: gl.constexpr, NESTED: gl.constexpr,
                   MASKED: gl.constexpr):  # fmt: skip
        """The warp's segment at word kw ([R, 1]; kw3 the same as [R, 1, 1]): its words of rows g ([R, 4, 8]) and
        g + 8, and the two rows' absmax ([R, 4]; qrow_*: the rows' first block, int64); with MASKED, zeros at kw >=
        kw_hi (else every segment asked for is inside the split)."""
        wa = _load(words_ptr + (row_a3 + (kw3 + w3)), kw3 < kw_hi, MASKED, "evict_first")
        wb = _load(words_ptr + (row_b3 + (kw3 + w3)), kw3 < kw_hi, MASKED, "evict_first")
        qcol = (8 * kw + 64 * t) // BLOCKSIZE  # [R, 4]: the lane's block in the row
        am_a = _absmax(absmax_ptr, code2_ptr, absmax2_ptr, off, qrow_a + qcol, kw < kw_hi, BLOCKSIZE2, NESTED, MASKED)
        am_b = _absmax(absmax_ptr, code2_ptr, absmax2_ptr, off, qrow_b + qcol, kw < kw_hi, BLOCKSIZE2, NESTED, MASKED)
        return wa, wb, am_a, am_b

    @gluon.jit
    def _fold(v, KWARPS: gl.constexpr, ROWS: gl.constexpr, SUM: gl.constexpr):
        """[R, 4, NT] (R = KWARPS x ROWS, the warps' K slices outermost) -> [ROWS, 4, NT]: the slices' sum (SUM) or
        their common value (an index all slices share)."""
        v = gl.reshape(v, [KWARPS, ROWS, 4, v.shape[2]])
        if SUM:
            return gl.sum(v, axis=0)
        else:
            return gl.max(v, axis=0)

    @gluon.jit
    def _fold4(a, KWARPS: gl.constexpr, ROWS: gl.constexpr):
        return (_fold(a[0], KWARPS, ROWS, True), _fold(a[1], KWARPS, ROWS, True), _fold(a[2], KWARPS, ROWS, True),
                _fold(a[3], KWARPS, ROWS, True))  # fmt: skip

    @gluon.jit
    def _acc_add(a, b):
        return a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]

    @gluon.jit
    def linear_4bit_mma_kernel(
        x_ptr, words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, bias_ptr, out_ptr,
        M, N, K_WORDS, BLOCKS_PER_ROW, x_sn, x_st4, x_ss4, x_si4, stride_om, words_per_split,
        BLOCKSIZE: gl.constexpr, BLOCKSIZE2: gl.constexpr, NESTED: gl.constexpr, HAS_BIAS: gl.constexpr,
        SPLIT: gl.constexpr, NT: gl.constexpr, WARPS: gl.constexpr, KWARPS: gl.constexpr, MASKED: gl.constexpr,
        PREFETCH: gl.constexpr, TABLE: gl.constexpr, MMA: gl.constexpr,
    ):  # fmt: skip
        """out[n, rows] (n < M <= 8 NT) over the K split pid_s (words_per_split words, a multiple of 32), for the
        16 WN W rows of program pid_r (WN = WARPS / KWARPS). Warp w takes row group w % WN and, of the split's
        segments, those with index = w // WN modulo KWARPS; the KWARPS partial sums are added at the end. MASKED:
        some split's segments are not a multiple of KWARPS (the last steps' missing segments load as zeros). x_ptr:
        x read as int32 pairs, pair p of word i of lane t's 64 columns of segment s, batch row n, at
        n x_sn + 4 (t x_st4 + s x_ss4 + i x_si4) + p (`x_strides`); words_ptr: W as int32 words [N, K_WORDS = K /
        8]; K a multiple of the blocksize."""
        WN: gl.constexpr = WARPS // KWARPS
        R: gl.constexpr = 8 * WARPS
        LN: gl.constexpr = gl.BlockedLayout([1, 1, NT], [8, 4, 1], [WARPS, 1, 1], [2, 1, 0])  # [R, 4, NT]
        L: gl.constexpr = gl.SliceLayout(2, LN)  # [R, 4]
        L3: gl.constexpr = gl.BlockedLayout([1, 1, 8], [8, 4, 1], [WARPS, 1, 1], [2, 1, 0])
        LX: gl.constexpr = gl.BlockedLayout([1, 1, NT, 4], [8, 4, 1, 1], [WARPS, 1, 1, 1], [3, 2, 1, 0])
        pid_r = gl.program_id(0)
        pid_s = gl.program_id(1)
        # [R, 4] indices: r = 8 warp + g, t
        r = gl.expand_dims(gl.arange(0, R, gl.SliceLayout(1, L)), 1)
        t = gl.expand_dims(gl.arange(0, 4, gl.SliceLayout(0, L)), 0)
        row_a = pid_r * (16 * WN) + (r // 8 % WN) * 16 + r % 8
        wk = r // 8 // WN  # [R, 1]: the warp's K slice
        row_b = row_a + 8
        qrow_a = gl.minimum(row_a, N - 1).to(gl.int64) * BLOCKS_PER_ROW  # rows past N re-read row N - 1
        qrow_b = gl.minimum(row_b, N - 1).to(gl.int64) * BLOCKS_PER_ROW
        # [R, 4, 8] offsets for the word loads
        r3 = gl.expand_dims(gl.expand_dims(gl.arange(0, R, gl.SliceLayout(1, gl.SliceLayout(2, L3))), 1), 2)
        i3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 8, gl.SliceLayout(0, gl.SliceLayout(1, L3))), 0), 1)
        t3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, gl.SliceLayout(0, gl.SliceLayout(2, L3))), 0), 2)
        w3 = 8 * t3 + i3  # [1, 4, 8]: word i of lane t's 64 columns, from the segment's first word
        row3 = pid_r * (16 * WN) + (r3 // 8 % WN) * 16 + r3 % 8
        wk3 = r3 // 8 // WN
        row_a3 = gl.minimum(row3, N - 1).to(gl.int64) * K_WORDS
        row_b3 = gl.minimum(row3 + 8, N - 1).to(gl.int64) * K_WORDS
        # x: [R, 4, NT, 4] pairs of the lane's batch rows n = 8 tile + g. Rows past M read row M - 1: B's column n
        # only reaches D's column n, which is not stored
        LX3: gl.constexpr = gl.SliceLayout(3, LX)
        rx = gl.expand_dims(gl.expand_dims(gl.expand_dims(
            gl.arange(0, R, gl.SliceLayout(1, gl.SliceLayout(2, LX3))), 1), 2), 3)  # fmt: skip
        tx = gl.expand_dims(gl.expand_dims(gl.expand_dims(
            gl.arange(0, 4, gl.SliceLayout(0, gl.SliceLayout(2, LX3))), 0), 2), 3)  # fmt: skip
        nx = gl.expand_dims(gl.expand_dims(gl.expand_dims(
            gl.arange(0, NT, gl.SliceLayout(0, gl.SliceLayout(1, LX3))), 0), 1), 3)  # fmt: skip
        jx = gl.expand_dims(gl.expand_dims(gl.expand_dims(
            gl.arange(0, 4, gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LX)))), 0), 1), 2)  # fmt: skip
        xi = x_ptr.to(gl.pointer_type(gl.int32), bitcast=True)  # x as 4-byte pairs
        x_lanes = xi + gl.minimum(8 * nx + rx % 8, M - 1).to(gl.int64) * x_sn + 4 * (x_st4 * tx) + jx
        wkx = rx // 8 // WN
        off = 0.0
        if NESTED:
            off = gl.load(offset_ptr)
        kw_lo = pid_s * words_per_split
        kw_hi = gl.minimum(kw_lo + words_per_split, K_WORDS)
        zero = gl.zeros([R, 4, NT], gl.float32, LN)
        acc_e = (zero, zero, zero, zero)  # even words
        acc_o = (zero, zero, zero, zero)  # odd words (two mma chains)
        steps = gl.cdiv((kw_hi - kw_lo) // 32, KWARPS)  # a warp's segments: step j is segment j KWARPS + wk
        if PREFETCH:
            nwa, nwb, nam_a, nam_b = _seg_loads(words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, off, row_a3, row_b3,
                                                w3, qrow_a, qrow_b, t, kw_lo + 32 * wk3, kw_lo + 32 * wk, kw_hi,
                                                BLOCKSIZE, BLOCKSIZE2, NESTED, MASKED)  # fmt: skip
        for j in range(0, steps):
            kw0 = kw_lo + 32 * KWARPS * j  # the step's first segment (the warps' own follow it)
            if PREFETCH:
                wa, wb, am_a, am_b = nwa, nwb, nam_a, nam_b
                nxt = kw0 + 32 * KWARPS  # the next step's (MASKED: none past the split; else the last re-reads its own)
                if not MASKED:
                    nxt = gl.minimum(nxt, kw_hi - 32 * KWARPS)
                nwa, nwb, nam_a, nam_b = _seg_loads(words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, off, row_a3,
                                                    row_b3, w3, qrow_a, qrow_b, t, nxt + 32 * wk3, nxt + 32 * wk,
                                                    kw_hi, BLOCKSIZE, BLOCKSIZE2, NESTED, MASKED)  # fmt: skip
            else:
                wa, wb, am_a, am_b = _seg_loads(words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, off, row_a3, row_b3,
                                                w3, qrow_a, qrow_b, t, kw0 + 32 * wk3, kw0 + 32 * wk, kw_hi,
                                                BLOCKSIZE, BLOCKSIZE2, NESTED, MASKED)  # fmt: skip
            kwx = kw0 + 32 * wkx  # [R, 1, 1, 1]: the warp's segment
            x_seg = x_lanes + 4 * (x_ss4 * (kwx // 32))
            x_ok = kwx < kw_hi
            ta = _table(am_a, TABLE)
            tb = _table(am_b, TABLE)
            wa0, wa1, wa2, wa3, wa4, wa5, wa6, wa7 = _split8(wa, L)
            wb0, wb1, wb2, wb3, wb4, wb5, wb6, wb7 = _split8(wb, L)
            acc_e = _word_mmas(wa0, wb0, ta, tb, _x_word(x_seg, x_ok, 0, x_si4, LN, MASKED), acc_e, MMA)
            acc_o = _word_mmas(wa1, wb1, ta, tb, _x_word(x_seg, x_ok, 1, x_si4, LN, MASKED), acc_o, MMA)
            acc_e = _word_mmas(wa2, wb2, ta, tb, _x_word(x_seg, x_ok, 2, x_si4, LN, MASKED), acc_e, MMA)
            acc_o = _word_mmas(wa3, wb3, ta, tb, _x_word(x_seg, x_ok, 3, x_si4, LN, MASKED), acc_o, MMA)
            acc_e = _word_mmas(wa4, wb4, ta, tb, _x_word(x_seg, x_ok, 4, x_si4, LN, MASKED), acc_e, MMA)
            acc_o = _word_mmas(wa5, wb5, ta, tb, _x_word(x_seg, x_ok, 5, x_si4, LN, MASKED), acc_o, MMA)
            acc_e = _word_mmas(wa6, wb6, ta, tb, _x_word(x_seg, x_ok, 6, x_si4, LN, MASKED), acc_e, MMA)
            acc_o = _word_mmas(wa7, wb7, ta, tb, _x_word(x_seg, x_ok, 7, x_si4, LN, MASKED), acc_o, MMA)
        acc = _acc_add(acc_e, acc_o)
        nt = gl.expand_dims(gl.expand_dims(gl.arange(0, NT, gl.SliceLayout(0, gl.SliceLayout(1, LN))), 0), 1)
        n0 = gl.expand_dims(2 * t + 0 * r, 2) + 8 * nt  # [R, 4, NT]: D's batch row of acc[0]
        rows = gl.expand_dims(row_a + 0 * t, 2) + 0 * nt
        if KWARPS > 1:  # the K slices' partial sums (Triton's cross-warp reduction) into [8 WN, 4, NT]
            acc = _fold4(acc, KWARPS, 8 * WN)
            n0 = _fold(n0, KWARPS, 8 * WN, False)
            rows = _fold(rows, KWARPS, 8 * WN, False)
        _store(acc, n0, rows, M, N, pid_s, bias_ptr, out_ptr, stride_om, HAS_BIAS, SPLIT)
else:  # pragma: no cover
    linear_4bit_mma_kernel = None

"""linear_4bit's "wgmma" kernel (Hopper, 16 < M <= 256; x and W both fp16 or both bf16): the mma kernel's
per-block tables feeding warpgroup tensor-core products, W in registers and x through shared memory.

The mma kernel (linear_4bit_mma) decodes each weight in ~3 instructions (a block's 16-entry table in the thread that
owns the block, byte permutes) into `mma.sync` operands, but every warp reads its own x: from M = 32 on, x's loads
from L2 bound it (docs/kernels/linear_4bit.md, session 21). The gemm path decodes with a shuffle per weight and moves
the tile through shared memory into wgmma's register layout (STS + LDSM, offline SASS). Here the same table decode
produces, in registers and with no data movement, wgmma's A operand: `wgmma.m64nNk16`'s register fragment is the
mma.sync m16n8k16 A fragment (lane 4 g + q: rows g, g + 8 of its warp's 16; columns 2 q, 2 q + 1, + 8, + 9 of each
16-column step), and the K order inside a 256-column segment is permuted so that lane q's columns are its own
quantization block's (64 q .. 64 q + 63: the block's table is in its registers). The warpgroup's B operand, x's
[64, BM] sub-tile, is read by every warp of the program from shared memory: x is copied once per call into that K
order (`x_perm`, `_x_perm_kernel`) and goes into shared memory by cp.async, by one of two pipelines:
- the segment pipeline (BM <= 64 a warpgroup: BM <= 64, or 128 with two warpgroups; `_segments`): two buffers of a whole
  segment's four sub-tiles (1 KB a batch row), one segment ahead, one barrier a segment, every product done at the
  segment's end;
- the sub-tile pipeline (BM > 64 a warpgroup, `_subtiles`): four buffers of one sub-tile each (512 bytes a batch row:
  128 KB at BM = 256, which the segment pipeline could not hold), two sub-tiles ahead, a barrier a sub-tile (two as
  compiled: Triton adds one after each cp.async wait), one product left in flight across sub-tiles and segments, the
  absmax loaded two segments ahead (`_am_raw`, `_am_gather`, `_am_final`) so that its code2 gather does not wait on the
  quantized absmax's load. At BM = 256 (M = 256 in one program) each weight is decoded once.

Logical column l of a segment's sub-tile s (l = 32 i2 + 16 j0 + 8 h + 2 q + e) holds physical column
64 q + 16 s + 8 i2 + 4 j0 + 2 h + e: word 2 s + i2 of lane q's block, its element 4 j0 + 2 h + e (bnb's high nibble
is the even element). A program takes BN = 64 WG W rows (WG warpgroups, each its own 64) and BM batch rows over its K
split; the accumulator [BN, BM] stays in registers (wgmma's layout), then goes to out (+ bias) or to the split-K
workspace. With ASYNC the sub-tiles' products are issued asynchronously, each decode overlapping the product before it
(at most two in flight; an A tile's registers kept until its product is done).

Sum order: the tensor core's inside each 16-column step (in the permuted K order), then the steps in order, fp32;
then the splits in order 0..S-1 (_splitk_reduce_kernel). GPU only (Gluon, inline PTX, wgmma: sm90); the op takes it
where `linear_4bit.wgmma_ok` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritonbits.ops import linear_4bit_mma as mma4

try:  # Gluon and its Hopper ops: triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
except ImportError:  # pragma: no cover - the CPU toolchain has Gluon too
    gluon = gl = None

# NOTE: the Triton this kernel has run on (GPU probes and tests: Triton 3.6 on the H100 and the H200); the same gate
# as the mma kernel's (Gluon is experimental: any other version takes the other paths)
AVAILABLE = mma4.AVAILABLE and gl is not None
SEGMENT = 256  # K columns a step: 4 lanes x 64 (as the mma kernel)
MIN_M, MAX_M = 17, 256  # the heuristic's range (NOTE on HEURISTIC_WGMMA in linear_4bit)
X_PERM_BLOCK = 1024  # 4-byte units a program of _x_perm_kernel


def decode16_asm() -> str:
    """decode_asm with its four pair outputs moved into eight 16-bit outputs ($0..$7, K order)."""
    body = mma4.decode_asm()
    # inputs $4..$12 -> $8..$16, outputs $0..$3 -> p0..p3
    for i in range(12, 3, -1):
        body = body.replace(f"${i}", f"${i + 4}")
    for i in range(4):
        body = body.replace(f"${i},", f"p{i},").replace(f"${i};", f"p{i};")
    body = body[1:-1]  # strip { }
    moves = " ".join(f"mov.b32 {{${2 * j}, ${2 * j + 1}}}, p{j};" for j in range(4))
    return "{ .reg .b32 p0, p1, p2, p3; " + body + " " + moves + " }"


def x_perm(x2: torch.Tensor) -> torch.Tensor:
    """x [M, K] (K a multiple of SEGMENT) -> its copy with each 256-column segment in the kernel's K order: logical
    column 32 i + 16 j0 + 8 h + 2 q + e holds physical 64 q + 8 i + 4 j0 + 2 h + e (i = 2 s + i2: word i of lane
    q's block). The layout's definition (the tests' oracle); the op makes the copy with _x_perm_kernel."""
    m, k = x2.shape
    return x2.reshape(m, k // 256, 4, 8, 2, 2, 2).permute(0, 1, 3, 4, 5, 2, 6).reshape(m, k).contiguous()


@triton.jit
def _x_perm_kernel(x_ptr, xp_ptr, M, stride_xm, K, BLOCK: tl.constexpr):
    """`x_perm` on the GPU (one bound launch in the op's plans): in 4-byte units (element pairs: x's row stride even
    and its address 4-byte aligned), unit 16 i + 8 j0 + 4 h + q of a segment from unit 32 q + 4 i + 2 j0 + h."""
    u = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    units = (u * 0 + M) * (K // 2)  # int64 (M may arrive as a constant)
    ok = u < units
    n = u // (K // 2)
    c = u % (K // 2)  # unit within the row (logical)
    seg = c // 128
    v = c % 128
    i = v // 16
    j0 = v // 8 % 2
    h = v // 4 % 2
    q = v % 4
    src = n * (stride_xm // 2) + seg * 128 + 32 * q + 4 * i + 2 * j0 + h
    xi = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    xo = xp_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    tl.store(xo + u, tl.load(xi + src, mask=ok), mask=ok)


if gl is not None:
    _DECODE16 = gl.constexpr(decode16_asm())
    _SEG = gl.constexpr(SEGMENT)
    _DECODE16_IO = gl.constexpr("=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r")
    _ABSMAX = gl.constexpr(mma4._ABSMAX_ASM)

    @gluon.jit
    def _decode16(word, tab, BF16: gl.constexpr):
        """A word [BN, 4] and its block's table planes -> its 8 weights in K order (8 tensors of DT)."""
        args = [word, tab[0], tab[1], tab[2], tab[3], tab[4], tab[5], tab[6], tab[7]]
        if BF16:
            bf = gl.bfloat16
            return gl.inline_asm_elementwise(_DECODE16, _DECODE16_IO, args, dtype=(bf, bf, bf, bf, bf, bf, bf, bf),
                                             is_pure=True, pack=1)  # fmt: skip
        else:
            hf = gl.float16
            return gl.inline_asm_elementwise(_DECODE16, _DECODE16_IO, args, dtype=(hf, hf, hf, hf, hf, hf, hf, hf),
                                             is_pure=True, pack=1)  # fmt: skip

    @gluon.jit
    def _j2(a, b):
        return gl.join(a, b)

    @gluon.jit
    def _a_tile(wa, wb, tab, AL: gl.constexpr, BF16: gl.constexpr):
        """Words i2 = 0 (wa) and 1 (wb) of each lane's block, [BN, 4] -> A [BN, 64] (logical column 32 i2 + 16 j0 +
        8 h + 2 q + e) in wgmma's register operand layout AL: register renames only (assert_trivial)."""
        a0, a1, a2, a3, a4, a5, a6, a7 = _decode16(wa, tab, BF16)  # element 4 j0 + 2 h + e
        b0, b1, b2, b3, b4, b5, b6, b7 = _decode16(wb, tab, BF16)
        ta = _j2(_j2(_j2(a0, a1), _j2(a2, a3)), _j2(_j2(a4, a5), _j2(a6, a7)))  # [BN, 4, e, h, j0]
        tb = _j2(_j2(_j2(b0, b1), _j2(b2, b3)), _j2(_j2(b4, b5), _j2(b6, b7)))
        t = gl.permute(_j2(ta, tb), (0, 5, 4, 3, 1, 2))  # [BN, q, e, h, j0, i2] -> [BN, i2, j0, h, q, e]
        return gl.convert_layout(gl.reshape(t, [t.shape[0], 64]), AL, assert_trivial=True)

    @gluon.jit
    def _seg_x_tiles(xp_ptr, K, M, pid_m, BM: gl.constexpr, WARPS: gl.constexpr):
        """Pointers [4 BM, 64] into x_perm's copy of a segment's four x sub-tiles (row s BM + m: batch row m, the
        segment's columns 64 s .. 64 s + 63, already in the kernel's K order; 16-byte runs) and their mask (rows past
        M are not read: cp.async fills them with zeros; B's column m only reaches D's column m, not stored there)."""
        XL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
        r = gl.expand_dims(gl.arange(0, 4 * BM, gl.SliceLayout(1, XL)), 1)
        m = r % BM + pid_m * BM
        c = gl.expand_dims(gl.arange(0, 64, gl.SliceLayout(0, XL)), 0) + 64 * (r // BM)
        return xp_ptr + gl.minimum(m, M - 1).to(gl.int64) * K + c, (m < M) & (c >= 0)

    @gluon.jit
    def _seg_x_copy(xs, x_ptrs, x_ok):
        """A segment's four x sub-tiles into xs [4 BM, 64] (one cp.async group)."""
        async_copy.async_copy_global_to_shared(xs, x_ptrs, mask=x_ok)
        async_copy.commit_group()

    @gluon.jit
    def _seg_x_sub(xs, s: gl.constexpr, BM: gl.constexpr):
        """Sub-tile s of xs as wgmma's B operand [64, BM]."""
        return xs.slice(s * BM, BM, dim=0).permute((1, 0))

    @gluon.jit
    def _segment(seg, seg_hi, xs, xs_next, x_ptrs, x_ok, words, am, acc, words_ptr, w_off, absmax_ptr, code2_ptr,
                 absmax2_ptr, off, qrow, q2, BLOCKSIZE: gl.constexpr, BLOCKSIZE2: gl.constexpr, NESTED: gl.constexpr,
                 TABLE: gl.constexpr, L: gl.constexpr, AL: gl.constexpr, BF16: gl.constexpr, ASYNC: gl.constexpr,
                 BM: gl.constexpr):  # fmt: skip
        """One 256-column segment: acc += its W rows (words, absmax: registers) times its x (xs, copied by the step
        before). The next segment's x copy (into xs_next), words and absmax are issued first."""
        async_copy.wait_group(0)
        fence_async_shared()
        gl.thread_barrier()  # every warp's copies into xs landed, and every warp is past its reads of xs_next
        nxt = gl.minimum(seg + 1, seg_hi - 1)  # the last segment re-reads its own
        _seg_x_copy(xs_next, x_ptrs + nxt * _SEG, x_ok)
        nwords = gl.load(words_ptr + (w_off + nxt * 32), eviction_policy="evict_first")
        nam = mma4._absmax(absmax_ptr, code2_ptr, absmax2_ptr, off, qrow + (nxt * _SEG + 64 * q2) // BLOCKSIZE,
                           q2 < 4, BLOCKSIZE2, NESTED, False)  # fmt: skip
        tab = mma4._table(am, TABLE)
        w0, w1, w2, w3, w4, w5, w6, w7 = mma4._split8(words, L)
        if ASYNC:  # each decode overlaps the product before it (one in flight; its A registers kept until done)
            a0 = _a_tile(w0, w1, tab, AL, BF16)
            tok = warpgroup_mma(a0, _seg_x_sub(xs, 0, BM), acc, is_async=True)
            a1 = _a_tile(w2, w3, tab, AL, BF16)
            tok = warpgroup_mma(a1, _seg_x_sub(xs, 1, BM), tok, is_async=True)
            tok, a0 = warpgroup_mma_wait(1, deps=(tok, a0))
            a2 = _a_tile(w4, w5, tab, AL, BF16)
            tok = warpgroup_mma(a2, _seg_x_sub(xs, 2, BM), tok, is_async=True)
            tok, a1 = warpgroup_mma_wait(1, deps=(tok, a1))
            a3 = _a_tile(w6, w7, tab, AL, BF16)
            tok = warpgroup_mma(a3, _seg_x_sub(xs, 3, BM), tok, is_async=True)
            acc, a2, a3 = warpgroup_mma_wait(0, deps=(tok, a2, a3))
        else:
            acc = warpgroup_mma(_a_tile(w0, w1, tab, AL, BF16), _seg_x_sub(xs, 0, BM), acc)
            acc = warpgroup_mma(_a_tile(w2, w3, tab, AL, BF16), _seg_x_sub(xs, 1, BM), acc)
            acc = warpgroup_mma(_a_tile(w4, w5, tab, AL, BF16), _seg_x_sub(xs, 2, BM), acc)
            acc = warpgroup_mma(_a_tile(w6, w7, tab, AL, BF16), _seg_x_sub(xs, 3, BM), acc)
        return nwords, nam, acc

    @gluon.jit
    def _sub_x_tiles(xp_ptr, K, M, pid_m, BM: gl.constexpr, WARPS: gl.constexpr):
        """Pointers [BM, 64] into x_perm's copy of one x sub-tile (row m: batch row m, the segment's first 64 columns,
        already in the kernel's K order; 16-byte runs; sub-tile u of the row is 64 u columns further) and their mask
        (rows past M are not read: cp.async fills them with zeros; B's column m only reaches D's column m, not stored
        there)."""
        XL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
        m = gl.expand_dims(gl.arange(0, BM, gl.SliceLayout(1, XL)), 1) + pid_m * BM
        c = gl.expand_dims(gl.arange(0, 64, gl.SliceLayout(0, XL)), 0)
        return xp_ptr + gl.minimum(m, M - 1).to(gl.int64) * K + c, (m < M) & (c >= 0)

    @gluon.jit
    def _sub_x_copy(xs, unit, units_hi, x_ptrs, x_ok):
        """x sub-tile `unit` (64-column steps of the row) into xs [BM, 64] (one cp.async group; past the split's last
        sub-tile, the last one again, so that every step commits one group)."""
        u = gl.minimum(unit, units_hi - 1)
        async_copy.async_copy_global_to_shared(xs, x_ptrs + u * 64, mask=x_ok)
        async_copy.commit_group()

    @gluon.jit
    def _sub_x_b(xs):
        """A sub-tile's buffer as wgmma's B operand [64, BM]."""
        return xs.permute((1, 0))

    @gluon.jit
    def _step(xs, xs_fill, unit, units_hi, x_ptrs, x_ok, w_a, w_b, tab, tok, a_prev, AL: gl.constexpr,
              BF16: gl.constexpr, PEND: gl.constexpr):  # fmt: skip
        """One x sub-tile: its copy landed (at most one later group pending) and is visible to every warp's wgmma,
        every warp is past the step before (so xs_fill, read two steps back, is free: each warp waited for that
        product before this barrier); the copy two sub-tiles ahead into xs_fill; then this sub-tile's A tile
        (words w_a, w_b of each lane's block) and its product, asynchronous, the one before it then waited for."""
        async_copy.wait_group(1)
        fence_async_shared()
        gl.thread_barrier()
        _sub_x_copy(xs_fill, unit + 2, units_hi, x_ptrs, x_ok)
        a = _a_tile(w_a, w_b, tab, AL, BF16)
        tok = warpgroup_mma(a, _sub_x_b(xs), tok, is_async=True)
        tok, a_prev = warpgroup_mma_wait(PEND, deps=(tok, a_prev))
        return tok, a

    @gluon.jit
    def _am_raw(absmax_ptr, absmax2_ptr, qblock, NESTED: gl.constexpr, BLOCKSIZE2: gl.constexpr):
        """A segment's absmax, first stage: the quantized absmax (nested: u8 index, and its absmax2) or the fp32
        absmax itself, loaded two segments ahead so that the code2 gather after it does not wait on it."""
        if NESTED:
            return gl.load(absmax_ptr + qblock).to(gl.int32), gl.load(absmax2_ptr + qblock // BLOCKSIZE2)
        else:
            a = gl.load(absmax_ptr + qblock)
            return a, a

    @gluon.jit
    def _am_gather(code2_ptr, q, NESTED: gl.constexpr):
        """Second stage, one segment ahead: code2[q] (nested), else the absmax as loaded."""
        if NESTED:
            return gl.load(code2_ptr + q)
        else:
            return q

    @gluon.jit
    def _am_final(c2, a2, off, NESTED: gl.constexpr):
        """Last stage, in the segment: bnb's nested absmax, code2[q] * absmax2 + offset (mul.ftz, add)."""
        if NESTED:
            return gl.inline_asm_elementwise(_ABSMAX, "=r,r,r,r", [c2, a2, off], dtype=gl.float32, is_pure=True,
                                             pack=1)  # fmt: skip
        else:
            return c2

    @gluon.jit
    def _segments(xp_ptr, words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, off, K, M, pid_m, w_off, qrow, q2, seg_lo,
                  seg_hi, BLOCKSIZE: gl.constexpr, BLOCKSIZE2: gl.constexpr,
                  NESTED: gl.constexpr, TABLE: gl.constexpr, L: gl.constexpr, AL: gl.constexpr, ACC: gl.constexpr,
                  XS: gl.constexpr, BF16: gl.constexpr, ASYNC: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                  WARPS: gl.constexpr):  # fmt: skip
        """The segment pipeline (BM <= 64 a warpgroup): two buffers of a whole segment's four x sub-tiles, one segment
        ahead, one barrier a segment, every product done at the segment's end. Returns the accumulator."""
        DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        x_ptrs, x_ok = _seg_x_tiles(xp_ptr, K, M, pid_m, BM, WARPS)
        xs_a = gl.allocate_shared_memory(DT, [4 * BM, 64], XS)
        xs_b = gl.allocate_shared_memory(DT, [4 * BM, 64], XS)
        acc = gl.zeros([BN, BM], gl.float32, ACC)
        _seg_x_copy(xs_a, x_ptrs + seg_lo * _SEG, x_ok)  # the first segment's x, words and absmax
        words = gl.load(words_ptr + (w_off + seg_lo * 32), eviction_policy="evict_first")
        am = mma4._absmax(absmax_ptr, code2_ptr, absmax2_ptr, off, qrow + (seg_lo * _SEG + 64 * q2) // BLOCKSIZE,
                          q2 < 4, BLOCKSIZE2, NESTED, False)  # fmt: skip
        for seg in range(seg_lo, seg_hi, 2):  # two segments a step: x's two buffers by name
            words, am, acc = _segment(seg, seg_hi, xs_a, xs_b, x_ptrs, x_ok, words, am, acc, words_ptr, w_off,
                                      absmax_ptr, code2_ptr, absmax2_ptr, off, qrow, q2, BLOCKSIZE, BLOCKSIZE2,
                                      NESTED, TABLE, L, AL, BF16, ASYNC, BM)  # fmt: skip
            if seg + 1 < seg_hi:
                words, am, acc = _segment(seg + 1, seg_hi, xs_b, xs_a, x_ptrs, x_ok, words, am, acc, words_ptr,
                                          w_off, absmax_ptr, code2_ptr, absmax2_ptr, off, qrow, q2, BLOCKSIZE,
                                          BLOCKSIZE2, NESTED, TABLE, L, AL, BF16, ASYNC, BM)  # fmt: skip
        return acc

    @gluon.jit
    def _subtiles(xp_ptr, words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, off, K, M, pid_m, w_off, qrow, q2, seg_lo,
                  seg_hi, BLOCKSIZE: gl.constexpr, BLOCKSIZE2: gl.constexpr,
                  NESTED: gl.constexpr, TABLE: gl.constexpr, L: gl.constexpr, AL: gl.constexpr, ACC: gl.constexpr,
                  XS: gl.constexpr, BF16: gl.constexpr, ASYNC: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                  WARPS: gl.constexpr):  # fmt: skip
        """The sub-tile pipeline (BM > 64 a warpgroup): four buffers of one x sub-tile each, two sub-tiles ahead, a
        barrier a sub-tile, one product left in flight across sub-tiles and segments; the absmax two segments ahead
        (_am_raw). Returns the accumulator."""
        DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        PEND: gl.constexpr = 1 if ASYNC else 0  # products left in flight after each issue
        qcol = (64 * q2) // BLOCKSIZE  # [1, 4]: lane q's block within a segment
        x_ptrs, x_ok = _sub_x_tiles(xp_ptr, K, M, pid_m, BM, WARPS)
        # x's four sub-tile buffers [BM, 64]: sub-tile s of every segment in buffer s, copied two sub-tiles ahead
        x0 = gl.allocate_shared_memory(DT, [BM, 64], XS)
        x1 = gl.allocate_shared_memory(DT, [BM, 64], XS)
        x2 = gl.allocate_shared_memory(DT, [BM, 64], XS)
        x3 = gl.allocate_shared_memory(DT, [BM, 64], XS)
        u_lo = 4 * seg_lo
        u_hi = 4 * seg_hi
        _sub_x_copy(x0, u_lo, u_hi, x_ptrs, x_ok)
        _sub_x_copy(x1, u_lo + 1, u_hi, x_ptrs, x_ok)
        last = seg_hi - 1
        words = gl.load(words_ptr + (w_off + seg_lo * 32), eviction_policy="evict_first")
        q_a, a2_a = _am_raw(absmax_ptr, absmax2_ptr, qrow + (seg_lo * _SEG) // BLOCKSIZE + qcol, NESTED, BLOCKSIZE2)
        c2 = _am_gather(code2_ptr, q_a, NESTED)  # this segment's, gathered
        a2 = a2_a
        s1 = gl.minimum(seg_lo + 1, last)
        q_n, a2_n = _am_raw(absmax_ptr, absmax2_ptr, qrow + (s1 * _SEG) // BLOCKSIZE + qcol, NESTED, BLOCKSIZE2)
        acc = gl.zeros([BN, BM], gl.float32, ACC)
        a_prev = gl.zeros([BN, 64], DT, AL)  # the last product's A registers, kept until it is done
        tok = acc
        for seg in range(seg_lo, seg_hi):
            u = 4 * seg
            nxt = gl.minimum(seg + 1, last)  # the last segment re-reads its own
            nwords = gl.load(words_ptr + (w_off + nxt * 32), eviction_policy="evict_first")
            nc2 = _am_gather(code2_ptr, q_n, NESTED)  # the next segment's (its q arrived during this one's)
            na2 = a2_n
            s2 = gl.minimum(seg + 2, last)
            q_n, a2_n = _am_raw(absmax_ptr, absmax2_ptr, qrow + (s2 * _SEG) // BLOCKSIZE + qcol, NESTED, BLOCKSIZE2)
            tab = mma4._table(_am_final(c2, a2, off, NESTED), TABLE)
            w0, w1, w2, w3, w4, w5, w6, w7 = mma4._split8(words, L)
            tok, a_prev = _step(x0, x2, u, u_hi, x_ptrs, x_ok, w0, w1, tab, tok, a_prev, AL, BF16, PEND)
            tok, a_prev = _step(x1, x3, u + 1, u_hi, x_ptrs, x_ok, w2, w3, tab, tok, a_prev, AL, BF16, PEND)
            tok, a_prev = _step(x2, x0, u + 2, u_hi, x_ptrs, x_ok, w4, w5, tab, tok, a_prev, AL, BF16, PEND)
            tok, a_prev = _step(x3, x1, u + 3, u_hi, x_ptrs, x_ok, w6, w7, tab, tok, a_prev, AL, BF16, PEND)
            words = nwords
            c2 = nc2
            a2 = na2
        acc, a_prev = warpgroup_mma_wait(0, deps=(tok, a_prev))
        return acc

    @gluon.jit
    def linear_4bit_wgmma_kernel(
        xp_ptr, words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, bias_ptr, out_ptr,
        M, N, K, K_WORDS, BLOCKS_PER_ROW, stride_om, segs_per_split,
        BLOCKSIZE: gl.constexpr, BLOCKSIZE2: gl.constexpr, NESTED: gl.constexpr, HAS_BIAS: gl.constexpr,
        SPLIT: gl.constexpr, BM: gl.constexpr, WG: gl.constexpr, TABLE: gl.constexpr, BF16: gl.constexpr,
        ASYNC: gl.constexpr,
    ):  # fmt: skip
        """out[m, rows] (+ bias) or the split's fp32 partial into the workspace [S, M, N], for program (pid_n: BN =
        64 WG W rows, pid_m: BM batch rows, pid_s: segs_per_split segments of K). xp_ptr: x_perm's copy [M, K];
        words_ptr: W as int32 words [N, K_WORDS = K / 8]; K a multiple of 256 and of the blocksize."""
        WARPS: gl.constexpr = 4 * WG
        DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        BN: gl.constexpr = 64 * WG
        # words [BN, 4, 8]: thread (warp w, lane 4 g + q) holds rows 16 w + g and + 8, block q's 8 words
        WL: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [8, 0, 0]],
            lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[[16, 0, 0], [32, 0, 0], [64, 0, 0]][: WG + 1],
            block_bases=[],
            shape=[BN, 4, 8],
        )
        L: gl.constexpr = gl.DistributedLinearLayout(  # [BN, 4]: one word (or absmax) of each row and block
            reg_bases=[[8, 0]],
            lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
            warp_bases=[[16, 0], [32, 0], [64, 0]][: WG + 1],
            block_bases=[],
            shape=[BN, 4],
        )
        ACC: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BM, 16]
        )
        AL: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
        XS: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, 64], DT)
        pid_n = gl.program_id(0)
        pid_m = gl.program_id(1)
        pid_s = gl.program_id(2)
        r3 = gl.expand_dims(gl.expand_dims(gl.arange(0, BN, gl.SliceLayout(1, gl.SliceLayout(2, WL))), 1), 2)
        q3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, gl.SliceLayout(0, gl.SliceLayout(2, WL))), 0), 2)
        i3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 8, gl.SliceLayout(0, gl.SliceLayout(1, WL))), 0), 1)
        rows3 = gl.minimum(pid_n * BN + r3, N - 1)  # rows past N re-read row N - 1 (not stored)
        w_off = rows3.to(gl.int64) * K_WORDS + (8 * q3 + i3)  # [BN, 4, 8]
        r2 = gl.expand_dims(gl.arange(0, BN, gl.SliceLayout(1, L)), 1)
        q2 = gl.expand_dims(gl.arange(0, 4, gl.SliceLayout(0, L)), 0)
        qrow = gl.minimum(pid_n * BN + r2, N - 1).to(gl.int64) * BLOCKS_PER_ROW  # [BN, 1]: the rows' first block
        off = 0.0
        if NESTED:
            off = gl.load(offset_ptr)
        seg_lo = pid_s * segs_per_split
        seg_hi = gl.minimum(seg_lo + segs_per_split, K // _SEG)
        # NOTE: which pipeline (H100 / H200, bf16, CUDA graphs; ci/linear4bit_wgmma_probe.py --baseline, session 23's
        # kernel, the segment pipeline at every BM, timed beside this one in one process; logs docs/gpu-runs/logs/
        # 20261125T0005Z-nvidia-h100-wgmma-subtile-probe.txt, 20261125T0015Z-nvidia-h100-wgmma-hybrid-probe.txt,
        # 20261125T0030Z-nvidia-h200-wgmma-hybrid-probe.txt): the sub-tile pipeline's best config took 0.73-0.98x the
        # segment pipeline's best time at M = 256 (BM = 256: 4096 x 14336 57.9 against 77.2 us on the H100), 0.98-1.04x
        # at M = 128 and 0.98-1.06x at M = 32 / 64 (eight barriers a segment as compiled where the segment pipeline has
        # two), so the sub-tile pipeline runs above 64 batch rows a warpgroup. At M = 128 the bench records
        # (20261125T004858Z / 005032Z, H200 003727Z / 003904Z) had it 0.92-0.98x session 23's records at 14336 x 4096,
        # 4096 x 4096 and 4096 x 6144. So the segment pipeline also runs at BM = 128 with two warpgroups (its buffers
        # fit there, 64 KB a warpgroup): in those probes it was faster at 31 of 36 such configs on the H100, at 14336 x
        # 4096 with four splits by 7% on both GPUs (42.1 / 42.0 against 45.1 / 45.2 us), elsewhere within 2% either way
        # (session 25).
        if BM > 64 * WG:  # the sub-tile pipeline where the segment pipeline's buffers would pass 64 KB a warpgroup
            acc = _subtiles(xp_ptr, words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, off, K, M, pid_m, w_off, qrow, q2,
                            seg_lo, seg_hi, BLOCKSIZE, BLOCKSIZE2, NESTED, TABLE, L, AL, ACC, XS, BF16, ASYNC, BM, BN,
                            WARPS)  # fmt: skip
        else:
            acc = _segments(xp_ptr, words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, off, K, M, pid_m, w_off, qrow, q2,
                            seg_lo, seg_hi, BLOCKSIZE, BLOCKSIZE2, NESTED, TABLE, L, AL, ACC, XS, BF16, ASYNC, BM, BN,
                            WARPS)  # fmt: skip
        async_copy.wait_group(0)
        OL: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [1, WARPS], [0, 1])  # rows along the lanes: coalesced
        d = gl.convert_layout(acc, OL)
        rr = gl.expand_dims(gl.arange(0, BN, gl.SliceLayout(1, OL)), 1) + pid_n * BN
        mm = gl.expand_dims(gl.arange(0, BM, gl.SliceLayout(0, OL)), 0) + pid_m * BM
        ok = (rr < N) & (mm < M)
        if SPLIT:
            gl.store(out_ptr + (pid_s.to(gl.int64) * M + mm) * N + rr, d, mask=ok)
        else:
            if HAS_BIAS:
                d += gl.load(bias_ptr + rr, mask=rr < N, other=0.0).to(gl.float32)
            gl.store(out_ptr + mm.to(gl.int64) * stride_om + rr, d.to(out_ptr.dtype.element_ty), mask=ok)
else:  # pragma: no cover
    linear_4bit_wgmma_kernel = None

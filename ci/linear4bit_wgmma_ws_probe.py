"""Probe (sm90): a warp-specialized prototype of linear_4bit's wgmma kernel, decode warps feeding shared-memory
wgmma, against the op (its current register-A wgmma kernel) and dense F.linear at M = 256.

    # offline, no GPU (the GPU machine's Triton 3.6 unpacked at /tmp/t36site):
    PYTHONPATH=/tmp/t36site:packages/kernels/src:packages/reference/src:packages/harness/src \\
        python ci/linear4bit_wgmma_ws_probe.py --compile-only [--dump DIR] [--configs ...] [--bm 128|256]
                                               [--compile-shape KxN]
    # on an H100 / H200 (the wheels in /tmp/site as docs/gpu-sessions.md installs them):
    PYTHONPATH=/tmp/site:packages/kernels/src:packages/reference/src:packages/harness/src \\
        python3 ci/linear4bit_wgmma_ws_probe.py [--shapes KxN,...] [--m 256] [--bm 128|256] [--configs wg2s4k1,...]
                                               [--rep MS] [--rounds R] [--skip-check | --check-only] [--json FILE]

Why: at M = 256 the op's wgmma kernel (ops/linear_4bit_wgmma.py, BM = 256, two warpgroups) keeps the tensor pipe busy
only ~55% of cycles (Nsight Compute: 255 registers a thread, 0.42 eligible warps a scheduler): each warpgroup decodes
its own register A operand between its products, and the decode's dependency chains are not hidden. Here the decode
moves to other warps (`gl.warp_specialize`, one program per BN = 64 WG W rows x BM = 256 batch rows x K split):

- the decode partition (4 warps, `worker_num_regs` registers) takes the program's W rows in WG halves of 64, each
  with the wgmma kernel's own decode and layouts (thread (warp w, lane 4 g + q): rows 16 w + g and + 8 of the half,
  block q's 8 words; per-block tables `mma4._table`; `wg4._a_tile`: the A tile [64, 64] of one x sub-tile, in
  x_perm's permuted K order). Words and absmax are loaded one segment ahead (the quantized absmax two, its code2
  gather one, as the op's sub-tile pipeline does). For each ring step (one 64-column x sub-tile) it waits for the
  stage's "empty" mbarrier, issues the x sub-tile [BM, 64] of x_perm's copy by TMA (`mbarrier.expect` on the stage's
  "full" barrier: its arrival and the bytes), stores the A tile into the stage's NVMMA-swizzled buffer [BN, 64] (rows
  64 h .. of half h: stmatrix), fences (generic -> async proxy) and arrives on "full" (count 2);
- the default partition (4 WG warps: WG consumer warpgroups, 64 W rows each) waits on "full", issues
  `warpgroup_mma(a_smem, x_smem^T, acc, is_async=True)` (m64n256k16 x 4 a warpgroup), waits for the product before it
  (`warpgroup_mma_wait(1)`) and arrives on that stage's "empty" barrier (count 1; Triton lowers each arrive as a
  partition-wide named barrier, then one thread's arrive); after the region, the epilogue (bias, bf16/fp16 out) or,
  with split K, the fp32 partial into the workspace for the op's `_splitk_reduce_kernel`.

A stage is (A [BN, 64], x [BM, 64]): 48 KB at WG = 2 and BM = 256 (4 stages: 192 KB), 32 KB at BM = 128 (`--bm`).
The product is x @ dequant(W).T as the op's wgmma kernel computes it (same K order, same decoded values, fp32
accumulation; steps in K order).

--compile-only compiles the kernel offline for sm90 (ci/sass_count.py's binder and tools; Gluon needs the GPU
machine's Triton 3.6 on PYTHONPATH) and prints registers (the kernel's and each partition's setmaxnreg), shared
memory, spills and SASS instruction counts, whole kernel and per loop (the decode loop has the PRMTs, the consumer
loop the HGMMAs). On a GPU: every config is checked against the exact dequantized product
(tritonbits_harness.tolerance.assert_matmul) on small problems (bias, M below BM, one and two batch-row tiles, N not a
multiple of BN, split K where a config of --configs splits) and at each timed shape (not the timing-only ablations,
`-nodecode` / `-nomma`; `--skip-check` checks nothing; each --json row says `checked`), then the prototype, the op
(tritonbits.linear_4bit) and dense F.linear(x, wd) are timed with do_bench_cudagraph (median of each round, rounds
interleaved, the median of the rounds reported), bf16 nf4 nested blocksize 64 at M = 256 (`--m`). Times include the
prototype's x_perm copy and split-K reduction (as the op's do).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path

import torch
import triton

from tritonbits.ops import linear_4bit as L
from tritonbits.ops import linear_4bit_mma as mma4
from tritonbits.ops import linear_4bit_wgmma as wg4

try:  # Gluon and its Hopper ops (the GPU machine's Triton 3.6)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover
    gluon = gl = None

SHAPES = "4096x14336,14336x4096,4096x28672,8192x28672"  # K x N
# name -> (WG, STAGES, split K, worker registers, ablation: 0 none; timing only, wrong by design: 1 the decode
# partition stores zero tiles (no words, no decode: the consumers and the x TMA alone), 2 the consumers issue no
# product (the decode partition and the x TMA alone); a sixth item "cp": x by cp.async from x_perm's copy, no TMA
# descriptor)
# NOTE: worker registers (offline, sm90, Triton 3.6): ptxas holds the decode partition to its setmaxnreg; at WG = 2 it
# spills below 152 (128: 104 B of stack, 50 STL/LDL), and 152 leaves the default partition 176 (the formula in
# Triton's AllocateWarpGroups: maxnreg 168 + (168 - 152) x 128 / 256, rounded down to 8); WG = 1 fits in 128.
# NOTE: a second decode partition (one a half at WG = 2: 16 warps) does not compile: the launch's register limit is
# then 65536 / 512 = 128, and ptxas refuses the m64n256 wgmma under 154 ("Insufficient registers (128)") whatever
# the partitions' setmaxnreg (tried with worker registers 96 and 88, session 26).
CONFIGS = {
    "wg2s4k1": (2, 4, 1, 152, 0),
    "wg2s3k1": (2, 3, 1, 152, 0),
    "wg2s4k2": (2, 4, 2, 152, 0),
    "wg2s4k4": (2, 4, 4, 152, 0),
    "wg1s4k1": (1, 4, 1, 128, 0),
    "wg2s4k1-nodecode": (2, 4, 1, 152, 1),
    "wg2s4k1-nomma": (2, 4, 1, 152, 2),
    "wg2s4k4-nodecode": (2, 4, 4, 152, 1),
    "wg2s4k4-nomma": (2, 4, 4, 152, 2),
    "wg2s4k1-cp": (2, 4, 1, 152, 0, "cp"),  # x by cp.async (XCOPY) instead of TMA
    "wg2s4k4-cp": (2, 4, 4, 152, 0, "cp"),
    "wg2s4k1-cp168": (2, 4, 1, 168, 0, "cp"),
    "wg2s4k1-cp160": (2, 4, 1, 160, 0, "cp"),
}
DEFAULT_CONFIGS = "wg2s4k1,wg2s3k1,wg2s4k2,wg2s4k4,wg1s4k1"
BM_ = 256  # batch rows a program (--bm: 128 or 256)
XLA = 2  # the cp.async configs (-cp): x copied this many ring steps ahead (NOTE at _XLA)

if gl is not None:
    _SEG = gl.constexpr(wg4.SEGMENT)
    # XCOPY: x's cp.async this many ring steps ahead. Step i waits for the release of step i + XLA - STAGES, which the
    # consumers give in their step i + XLA - STAGES + 1 after waiting for "full" of that step: so STAGES >= XLA + 2,
    # else step i waits on its own arrival (a hang; `plan` refuses it)
    _XLA = gl.constexpr(XLA)

    @gluon.jit
    def _produce(i, unit, wa0, wb0, tab0, wa1, wb1, tab1, a_bufs, x_bufs, full, empty, x_desc, m0, xp_ptr, M, K,
                 total, AL: gl.constexpr, BF16: gl.constexpr, WG: gl.constexpr, STAGES: gl.constexpr,
                 XBYTES: gl.constexpr, ABLATE: gl.constexpr, XCOPY: gl.constexpr):  # fmt: skip
        """Ring step i (x sub-tile `unit` of the row): once the stage is free, x's sub-tile by TMA (expect-tx on the
        stage's "full" barrier) and the A tile (words wa*, wb* of each lane's block: rows 0..63 from half 0, 64..127
        from half 1 at WG = 2) into the stage; then the fence and the partition's one arrival.
        XCOPY: x by cp.async instead, from a plain pointer (no TMA descriptor), XLA steps ahead: step i + XLA's stage
        waited for and its x copy issued (masked off past the last step), the A tile stored, then step i's copy group
        waited for (cp.async.wait_group XLA) and fenced by the copying threads themselves before the arrival."""
        stage = i % STAGES
        bar = full.index(stage)
        if XCOPY:
            j = i + _XLA
            mbarrier.wait(empty.index(j % STAGES), ((j // STAGES) & 1) ^ 1)  # product j - STAGES done
            xp_tile, x_ok = _x_tile(xp_ptr, m0, M, K, x_bufs.shape[1])  # (recomputed: no live pointer registers)
            async_copy.async_copy_global_to_shared(x_bufs.index(j % STAGES), xp_tile + (unit + _XLA) * 64,
                                                   mask=x_ok & (j < total))  # fmt: skip
            async_copy.commit_group()
        else:
            phase = (i // STAGES) & 1
            mbarrier.wait(empty.index(stage), phase ^ 1)  # the consumer's product of step i - STAGES is done
            mbarrier.expect(bar, XBYTES)
            tma.async_copy_global_to_shared(x_desc, [m0, unit * 64], bar, x_bufs.index(stage))
        a_s = a_bufs.index(stage)
        if ABLATE == 1:  # timing only: no decode
            a_s.store(gl.zeros([64 * WG, 64], a_s.dtype, gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])))
        else:
            a_s.slice(0, 64, dim=0).store(wg4._a_tile(wa0, wb0, tab0, AL, BF16))
            if WG == 2:
                a_s.slice(64, 64, dim=0).store(wg4._a_tile(wa1, wb1, tab1, AL, BF16))
        if XCOPY:
            async_copy.wait_group(_XLA)  # step i's x copies (issued XLA steps ago) landed
        fence_async_shared()  # this thread's generic-proxy stores (and copies), before wgmma's async-proxy reads
        if XCOPY:  # every thread's fence before the one arrival (the TMA path's arrive is lowered after a bar.sync
            gl.thread_barrier()  # that follows the fence; with the cp.async wait Triton puts its bar.sync before it)
        mbarrier.arrive(bar, count=1)  # (lowered: the partition's threads synchronize, then one arrives)

    @gluon.jit
    def _x_tile(xp_ptr, m0, M, K, BM: gl.constexpr):
        """XCOPY: pointers [BM, 64] to x_perm's copy at batch rows m0 .., columns 0 .. 63 (16-byte runs; sub-tile u is
        64 u further) and their mask (rows past M: zero-filled by cp.async, never read)."""
        XL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        xr = gl.expand_dims(gl.arange(0, BM, gl.SliceLayout(1, XL)), 1) + m0
        xc = gl.expand_dims(gl.arange(0, 64, gl.SliceLayout(0, XL)), 0)
        return xp_ptr + gl.minimum(xr, M - 1).to(gl.int64) * K + xc, (xr < M) & (xc >= 0)

    @gluon.jit
    def _half_setup(words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, w_off, qrow, qcol, seg_lo, last,
                    BLOCKSIZE: gl.constexpr, BLOCKSIZE2: gl.constexpr, NESTED: gl.constexpr):  # fmt: skip
        """A half's first segment's words, its absmax's code2 gather and absmax2, the next segment's raw absmax."""
        words = gl.load(words_ptr + (w_off + seg_lo * 32), eviction_policy="evict_first")
        q_a, a2 = wg4._am_raw(absmax_ptr, absmax2_ptr, qrow + (seg_lo * _SEG) // BLOCKSIZE + qcol, NESTED, BLOCKSIZE2)
        c2 = wg4._am_gather(code2_ptr, q_a, NESTED)
        s1 = gl.minimum(seg_lo + 1, last)
        q_n, a2_n = wg4._am_raw(absmax_ptr, absmax2_ptr, qrow + (s1 * _SEG) // BLOCKSIZE + qcol, NESTED, BLOCKSIZE2)
        return words, c2, a2, q_n, a2_n

    @gluon.jit
    def _half_next(words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, w_off, qrow, qcol, seg, last, q_n, a2_n,
                   BLOCKSIZE: gl.constexpr, BLOCKSIZE2: gl.constexpr, NESTED: gl.constexpr):  # fmt: skip
        """In segment seg: the next segment's words and code2 gather, the raw absmax two segments ahead."""
        nxt = gl.minimum(seg + 1, last)  # the last segment re-reads its own
        nwords = gl.load(words_ptr + (w_off + nxt * 32), eviction_policy="evict_first")
        nc2 = wg4._am_gather(code2_ptr, q_n, NESTED)
        s2 = gl.minimum(seg + 2, last)
        q_n2, a2_n2 = wg4._am_raw(absmax_ptr, absmax2_ptr, qrow + (s2 * _SEG) // BLOCKSIZE + qcol, NESTED,
                                  BLOCKSIZE2)  # fmt: skip
        return nwords, nc2, a2_n, q_n2, a2_n2

    @gluon.jit
    def _decode_partition(x_desc, words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, a_bufs, x_bufs, full,
                          empty, N, K_WORDS, BLOCKS_PER_ROW, pid_n, m0, seg_lo, seg_hi, BLOCKSIZE: gl.constexpr,
                          BLOCKSIZE2: gl.constexpr, NESTED: gl.constexpr, TABLE: gl.constexpr, BF16: gl.constexpr,
                          BM: gl.constexpr, WG: gl.constexpr, STAGES: gl.constexpr,
                          ABLATE: gl.constexpr, xp_ptr, M, K, XCOPY: gl.constexpr):  # fmt: skip
        """4 warps: W rows pid_n BN .. + BN - 1 (BN = 64 WG: WG halves of 64) over the segments [seg_lo, seg_hi),
        with the wgmma kernel's decode and its WG = 1 layouts for each half (thread (warp w, lane 4 g + q): rows
        16 w + g and + 8 of the half, block q's 8 words), and x's sub-tiles by TMA."""
        BN: gl.constexpr = 64 * WG
        XBYTES: gl.constexpr = BM * 64 * 2
        WL: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [8, 0, 0]],
            lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[[16, 0, 0], [32, 0, 0]],
            block_bases=[],
            shape=[64, 4, 8],
        )
        L: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[8, 0]],
            lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
            warp_bases=[[16, 0], [32, 0]],
            block_bases=[],
            shape=[64, 4],
        )
        ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BM, 16])
        AL: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
        r3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 64, gl.SliceLayout(1, gl.SliceLayout(2, WL))), 1), 2)
        q3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, gl.SliceLayout(0, gl.SliceLayout(2, WL))), 0), 2)
        i3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 8, gl.SliceLayout(0, gl.SliceLayout(1, WL))), 0), 1)
        r2 = gl.expand_dims(gl.arange(0, 64, gl.SliceLayout(1, L)), 1)
        q2 = gl.expand_dims(gl.arange(0, 4, gl.SliceLayout(0, L)), 0)
        qcol = (64 * q2) // BLOCKSIZE  # [1, 4]: lane q's block within a segment
        row0 = pid_n * BN
        # rows past N re-read row N - 1 (not stored)
        w_off0 = gl.minimum(row0 + r3, N - 1).to(gl.int64) * K_WORDS + (8 * q3 + i3)  # [64, 4, 8]
        qrow0 = gl.minimum(row0 + r2, N - 1).to(gl.int64) * BLOCKS_PER_ROW  # [64, 1]: the rows' first block
        off = 0.0
        if NESTED:
            off = gl.load(offset_ptr)
        last = seg_hi - 1
        total = 4 * (seg_hi - seg_lo)
        if XCOPY:  # the first XLA steps' x (fresh stages)
            xp_tile, x_ok = _x_tile(xp_ptr, m0, M, K, BM)
            for la in gl.static_range(_XLA):
                async_copy.async_copy_global_to_shared(x_bufs.index(la), xp_tile + (4 * seg_lo + la) * 64,
                                                       mask=x_ok & (la < total))  # fmt: skip
                async_copy.commit_group()
        words0, c2_0, a2_0, q_n0, a2_n0 = _half_setup(words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, w_off0, qrow0,
                                                      qcol, seg_lo, last, BLOCKSIZE, BLOCKSIZE2, NESTED)  # fmt: skip
        if WG == 2:
            w_off1 = gl.minimum(row0 + 64 + r3, N - 1).to(gl.int64) * K_WORDS + (8 * q3 + i3)
            qrow1 = gl.minimum(row0 + 64 + r2, N - 1).to(gl.int64) * BLOCKS_PER_ROW
            words1, c2_1, a2_1, q_n1, a2_n1 = _half_setup(words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, w_off1,
                                                          qrow1, qcol, seg_lo, last, BLOCKSIZE, BLOCKSIZE2,
                                                          NESTED)  # fmt: skip
        for seg in range(seg_lo, seg_hi):
            nwords0, nc2_0, na2_0, q_n0, a2_n0 = _half_next(words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, w_off0,
                                                            qrow0, qcol, seg, last, q_n0, a2_n0, BLOCKSIZE,
                                                            BLOCKSIZE2, NESTED)  # fmt: skip
            tab0 = mma4._table(wg4._am_final(c2_0, a2_0, off, NESTED), TABLE)
            w0, w1, w2, w3, w4, w5, w6, w7 = mma4._split8(words0, L)
            if WG == 2:
                nwords1, nc2_1, na2_1, q_n1, a2_n1 = _half_next(words_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
                                                                w_off1, qrow1, qcol, seg, last, q_n1, a2_n1,
                                                                BLOCKSIZE, BLOCKSIZE2, NESTED)  # fmt: skip
                tab1 = mma4._table(wg4._am_final(c2_1, a2_1, off, NESTED), TABLE)
                v0, v1, v2, v3, v4, v5, v6, v7 = mma4._split8(words1, L)
            else:  # (unused: one half)
                tab1 = tab0
                v0, v1, v2, v3, v4, v5, v6, v7 = w0, w1, w2, w3, w4, w5, w6, w7
            i = 4 * (seg - seg_lo)
            u = 4 * seg
            _produce(i, u, w0, w1, tab0, v0, v1, tab1, a_bufs, x_bufs, full, empty, x_desc, m0, xp_ptr,
                     M, K, total, AL, BF16, WG, STAGES, XBYTES, ABLATE, XCOPY)  # fmt: skip
            _produce(i + 1, u + 1, w2, w3, tab0, v2, v3, tab1, a_bufs, x_bufs, full, empty, x_desc, m0, xp_ptr,
                     M, K, total, AL, BF16, WG, STAGES, XBYTES, ABLATE, XCOPY)  # fmt: skip
            _produce(i + 2, u + 2, w4, w5, tab0, v4, v5, tab1, a_bufs, x_bufs, full, empty, x_desc, m0, xp_ptr,
                     M, K, total, AL, BF16, WG, STAGES, XBYTES, ABLATE, XCOPY)  # fmt: skip
            _produce(i + 3, u + 3, w6, w7, tab0, v6, v7, tab1, a_bufs, x_bufs, full, empty, x_desc, m0, xp_ptr,
                     M, K, total, AL, BF16, WG, STAGES, XBYTES, ABLATE, XCOPY)  # fmt: skip
            words0 = nwords0
            c2_0 = nc2_0
            a2_0 = na2_0
            if WG == 2:
                words1 = nwords1
                c2_1 = nc2_1
                a2_1 = na2_1
        if XCOPY:  # the masked-off copies past the last step (they write zeros) land before the epilogue reuses
            async_copy.wait_group(0)  # the shared memory

    @gluon.jit
    def _mma_partition(a_bufs, x_bufs, full, empty, units, BM: gl.constexpr, BN: gl.constexpr,
                       STAGES: gl.constexpr, WARPS: gl.constexpr, ABLATE: gl.constexpr):  # fmt: skip
        """The default partition (WARPS = 4 WG warps): one product a ring step, the one before it waited for and
        its stage released. Returns (the accumulator [BN, BM], wgmma's layout)."""
        ACC: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BM, 16]
        )
        acc = gl.zeros([BN, BM], gl.float32, ACC)
        for i in range(units):
            stage = i % STAGES
            mbarrier.wait(full.index(stage), (i // STAGES) & 1)
            if ABLATE == 2:  # timing only: no product
                mbarrier.arrive(empty.index(stage), count=1)
            else:
                tok = warpgroup_mma(a_bufs.index(stage), x_bufs.index(stage).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(1, deps=(tok,))  # the product of step i - 1 is done: release its stage
                mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1, pred=i > 0)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        return (acc,)  # warp_specialize flattens the default partition's results as a sequence

    @gluon.jit
    def linear_4bit_wgmma_ws_kernel(
        x_desc, xp_ptr, words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, bias_ptr, out_ptr,
        M, N, K, K_WORDS, BLOCKS_PER_ROW, stride_om, segs_per_split,
        BLOCKSIZE: gl.constexpr, BLOCKSIZE2: gl.constexpr, NESTED: gl.constexpr, HAS_BIAS: gl.constexpr,
        SPLIT: gl.constexpr, BM: gl.constexpr, WG: gl.constexpr, STAGES: gl.constexpr, TABLE: gl.constexpr,
        BF16: gl.constexpr, WORKER_REGS: gl.constexpr, ABLATE: gl.constexpr, XCOPY: gl.constexpr,
    ):  # fmt: skip
        """out[m, rows] (+ bias), or the split's fp32 partial into the workspace [S, M, N], for program (pid_n: BN =
        64 WG W rows, pid_m: BM batch rows, pid_s: segs_per_split segments of K). x_desc: TMA descriptor of x_perm's
        copy [M, K], block [BM, 64]; words_ptr: W as int32 words [N, K_WORDS = K / 8]; K a multiple of 256 and of
        the blocksize. num_warps = 4 WG (the consumers); the decode partitions add 4 WG warps."""
        WARPS: gl.constexpr = 4 * WG
        DT: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
        BN: gl.constexpr = 64 * WG
        AS: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, 64], DT)
        a_bufs = gl.allocate_shared_memory(DT, [STAGES, BN, 64], AS)
        x_bufs = gl.allocate_shared_memory(DT, [STAGES, BM, 64], x_desc.layout)
        full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            if XCOPY:
                mbarrier.init(full.index(s), count=1)  # the decode partition's arrival (its copies waited before)
            else:
                mbarrier.init(full.index(s), count=2)  # the decode partition's arrival and its x TMA's expect
            mbarrier.init(empty.index(s), count=1)  # the consumer partition
        fence_async_shared()  # the inits, before the TMA (async proxy) completes bytes on them
        pid_n = gl.program_id(0)
        pid_m = gl.program_id(1)
        pid_s = gl.program_id(2)
        m0 = pid_m * BM
        seg_lo = pid_s * segs_per_split
        seg_hi = gl.minimum(seg_lo + segs_per_split, K // _SEG)
        units = 4 * (seg_hi - seg_lo)
        res = gl.warp_specialize(
            [(_mma_partition, (a_bufs, x_bufs, full, empty, units, BM, BN, STAGES, WARPS, ABLATE)),
             (_decode_partition, (x_desc, words_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, a_bufs, x_bufs,
                                  full, empty, N, K_WORDS, BLOCKS_PER_ROW, pid_n, m0, seg_lo, seg_hi, BLOCKSIZE,
                                  BLOCKSIZE2, NESTED, TABLE, BF16, BM, WG, STAGES, ABLATE, xp_ptr, M, K,
                                  XCOPY))],
            [4], [WORKER_REGS])  # fmt: skip
        acc = res[0]
        OL: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [1, WARPS], [0, 1])  # rows along the lanes: coalesced
        d = gl.convert_layout(acc, OL)
        rr = gl.expand_dims(gl.arange(0, BN, gl.SliceLayout(1, OL)), 1) + pid_n * BN
        mm = gl.expand_dims(gl.arange(0, BM, gl.SliceLayout(0, OL)), 0) + m0
        ok = (rr < N) & (mm < M)
        if SPLIT:
            gl.store(out_ptr + (pid_s.to(gl.int64) * M + mm) * N + rr, d, mask=ok)
        else:
            if HAS_BIAS:
                d += gl.load(bias_ptr + rr, mask=rr < N, other=0.0).to(gl.float32)
            gl.store(out_ptr + mm.to(gl.int64) * stride_om + rr, d.to(out_ptr.dtype.element_ty), mask=ok)
else:  # pragma: no cover
    linear_4bit_wgmma_ws_kernel = None


def _maxnreg(wg: int) -> int:
    """The kernel's register limit (ptxas's cap for every partition, setmaxnreg or not): 64K registers over its
    4 WG + 4 warps, at most 168 (WG = 1: the default partition's share stays under setmaxnreg's 256)."""
    return min(168, 65536 // (32 * 4 * (wg + 1)) // 8 * 8)


def x_layout(dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for([BM_, 64], gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def plan(x2: torch.Tensor, w, bias, out: torch.Tensor, name: str, xp: torch.Tensor | None = None):
    """The prototype's launches for x2 [M, K] and the prepared weight w: (x_perm launch, kernel launch, reduce launch
    or None, the workspace or None). Every tensor of the call is made here (CUDA graphs replay them)."""
    wg, stages, split_k, regs, ablate = CONFIGS[name][:5]
    xcopy = len(CONFIGS[name]) > 5 and CONFIGS[name][5] == "cp"
    if xcopy and stages < XLA + 2:
        raise ValueError(f"{name}: x by cp.async {XLA} steps ahead needs at least {XLA + 2} stages (else it hangs)")
    m, k = x2.shape
    state = w.state
    n, bs = state.shape[0], state.blocksize
    if k % wg4.SEGMENT or k % bs or x2.dtype != state.dtype or x2.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"the prototype needs K a multiple of 256 and of the blocksize, x and W one 16-bit dtype: {name}"
        )
    split, per_split = L.mma_splits({"split_k": split_k}, k)
    nested = w.code2 is not None
    ws = torch.empty((split, m, n), dtype=torch.float32, device=x2.device) if split > 1 else None
    xp = torch.empty(m, k, dtype=x2.dtype, device=x2.device) if xp is None else xp
    desc = TensorDescriptor.from_tensor(xp, [BM_, 64], x_layout(x2.dtype))
    dummy = w.absmax
    bf16 = state.dtype == torch.bfloat16
    args = (desc, xp, L.words_of(w), w.absmax, w.code2 if nested else dummy, w.absmax2 if nested else dummy,
            w.offset if nested else dummy, bias if bias is not None else dummy, ws if ws is not None else out,
            m, n, k, k // 8, k // bs, out.stride(0), per_split)  # fmt: skip
    constexprs = {"BLOCKSIZE": bs, "BLOCKSIZE2": w.blocksize2 if nested else 1, "NESTED": nested,
                  "HAS_BIAS": bias is not None, "SPLIT": ws is not None, "BM": BM_, "WG": wg, "STAGES": stages,
                  "TABLE": mma4.table_asm(L.formats.code_values(state.quant_type).tolist(), bf16), "BF16": bf16,
                  "WORKER_REGS": regs, "ABLATE": ablate, "XCOPY": xcopy}  # fmt: skip
    options = {"num_warps": 4 * wg, "maxnreg": _maxnreg(wg)}
    units = m * k // 2
    perm = (wg4._x_perm_kernel, (triton.cdiv(units, wg4.X_PERM_BLOCK),), (x2, xp, m, x2.stride(0), k),
            {"BLOCK": wg4.X_PERM_BLOCK}, {"num_warps": 4})  # fmt: skip
    main = (linear_4bit_wgmma_ws_kernel, (triton.cdiv(n, 64 * wg), triton.cdiv(m, BM_), split), args, constexprs,
            options)  # fmt: skip
    red = L._reduce_launch(ws, bias, out, False) if ws is not None else None
    return perm, main, red, ws


def run_plan(p) -> None:
    perm, main, red, _ws = p
    for fn, grid, args, cx, opts in (perm, main):
        fn[grid](*args, **cx, **opts)
    if red is not None:
        red.fn[red.grid](*red.args, **red.constexprs, **red.options)


def forward(x2, w, bias, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty(x2.shape[0], w.state.shape[0], dtype=x2.dtype, device=x2.device) if out is None else out
    run_plan(plan(x2, w, bias, out, name))
    return out


# ---------------------------------------------------------------------------------------------------------
# Offline compile (no GPU)


def _loops(sass: str) -> list[dict]:
    """Each loop of the listing (a backward branch before the last EXIT: the branches after it are the mbarrier
    waits' out-of-line retries), its address range, instruction count and key opcodes, innermost first."""
    import re

    import sass_count as sc

    instrs, labels = sc.parse(sass)
    last_exit = max((a for a, op, _ in instrs if op == "EXIT"), default=-1)
    loops = []
    for a, op, rest in instrs:
        mt = re.search(r"\((\.L_x_\d+)\)", rest) if op == "BRA" and a < last_exit else None
        if mt and labels.get(mt.group(1), a + 1) <= a:
            lo = labels[mt.group(1)]
            body = [o.split(".")[0] for x, o, _ in instrs if lo <= x <= a and o != "NOP"]
            c = Counter(body)
            key = {k: c[k] for k in KEY_OPS if c[k]}
            kind = "consumer" if c["HGMMA"] else "decode" if c["PRMT"] > 64 else "wait" if len(body) <= 4 else "?"
            loops.append({"from": lo, "to": a, "instr": len(body), "kind": kind, "key": key})
    for lp in loops:  # a loop around another (the workers' wait for a warp-specialized region): "outer"
        if any(o is not lp and o["kind"] != "wait" and lp["from"] <= o["from"] and o["to"] <= lp["to"] for o in loops):
            lp["kind"] = "outer"
    return sorted(loops, key=lambda lp: lp["to"] - lp["from"])


KEY_OPS = (
    "HGMMA",
    "WARPGROUP",
    "PRMT",
    "LDG",
    "LDS",
    "STS",
    "STSM",
    "SYNCS",
    "UTMALDG",
    "BAR",
    "FMUL",
    "F2FP",
    "STL",
    "LDL",
)


def _compile(name: str, n: int, k: int, m: int, dtype=torch.bfloat16, qt="nf4", nested=True, bs=64, bias=False):
    """Offline sm90 compile of the prototype's kernel as `plan` would launch it; (kernel, launch)."""
    import sass_count as sc
    from triton.backends.compiler import GPUTarget

    w = sc._planned_weight(n, k, dtype, qt, nested, bs)
    x2 = torch.empty(m, k, dtype=dtype)
    out = torch.empty(m, n, dtype=dtype)
    b = torch.empty(n, dtype=dtype) if bias else None
    sm_count = L._sm_count
    L._sm_count = lambda device: 132  # type: ignore[assignment]  # the split-K reduction's grid as on an H100
    try:
        _perm, (fn, grid, args, cx, opts), _red, _ws = plan(x2, w, b, out, name)
    finally:
        L._sm_count = sm_count  # type: ignore[assignment]
    launch = sc.Launch(name, fn, grid, args, cx, opts, 64 * CONFIGS[name][0] * k // grid[2])
    return sc.compile_launch(launch, GPUTarget("cuda", 90, 32)), launch


VARIANTS = (  # compiled too (the GPU checks' formats): dtype, quant type, nested, blocksize, bias, M
    (torch.float16, "nf4", True, 256, True, 200),
    (torch.bfloat16, "fp4", False, 128, False, 256),
    (torch.bfloat16, "nf4", True, 64, True, 300),
)


def compile_only(names: list[str], dump: Path | None, shape: tuple[int, int]) -> int:
    """Compile each config offline for sm90 and print its resources and SASS counts; returns failures."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import re

    import sass_count as sc

    if linear_4bit_wgmma_ws_kernel is None:
        raise SystemExit("--compile-only: this Triton has no Gluon (put the GPU machine's 3.6 on PYTHONPATH)")
    k, n = shape
    print(f"triton {triton.__version__}, sm90, bf16 nf4 nested bs64, W {n} x {k}, M = {BM_}", flush=True)
    fails = 0
    for name in names:
        wg, stages, split_k, regs, _ablate = CONFIGS[name][:5]
        try:
            kernel, la = _compile(name, n, k, BM_)
        except Exception as exc:  # one config failing must not hide the others
            print(f"{name}: COMPILE ERROR {type(exc).__name__}: {str(exc)[-3000:]}", flush=True)
            fails += 1
            continue
        sass, usage = sc.disassemble(kernel.asm["cubin"])
        c = sc.count(sass)
        ptx = kernel.asm["ptx"]
        setmax = re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)
        md = kernel.metadata
        print(f"{name}: WG={wg} STAGES={stages} split_k={split_k} grid={la.grid} num_warps={la.options['num_warps']} "
              f"+ 4 decode warps (total {getattr(md, 'num_warps', '?')}), maxnreg={la.options['maxnreg']}, "
              f"worker_num_regs={regs}", flush=True)  # fmt: skip
        print(f"  registers at launch {usage.get('REG')}; setmaxnreg (PTX, in order): "
              + ", ".join(f"{d} {v}" for d, v in setmax)
              + "  [the default partition's in the region: the first dec; the decode partition's: the last inc]",
              flush=True)  # fmt: skip
        spills = sum(1 for line in sass.splitlines() if re.search(r"\b(STL|LDL)\b", line))
        print(f"  shared {md.shared} B; stack {usage.get('STACK')} B, local {usage.get('LOCAL')} B, STL/LDL "
              f"{spills}", flush=True)  # fmt: skip
        print(
            f"  SASS {c['total']} instructions; top: "
            + " ".join(f"{op}={v}" for op, v in list(c["opcodes"].items())[:20]),
            flush=True,
        )
        for lp in _loops(sass):
            extra = ""
            if lp["kind"] == "decode":  # a segment: 4 sub-tiles of 64 columns x 64 WG rows over 128 threads
                extra = f" = {lp['instr'] / (256 * 64 * wg / 128):.2f} a weight"
            print(f"  loop {lp['from']:#06x}..{lp['to']:#06x} ({lp['kind']}): {lp['instr']} instr{extra} {lp['key']}",
                  flush=True)  # fmt: skip
        if dump is not None:
            dump.mkdir(parents=True, exist_ok=True)
            for ext in ("sass", "ptx", "ttgir"):
                (dump / f"ws_{name}.{ext}").write_text(sass if ext == "sass" else kernel.asm[ext])
    for dtype, qt, nested, bs, bias, m in VARIANTS:
        for name in names[:1]:
            desc = f"{name} {str(dtype)[6:]} {qt} nested={nested} bs{bs} bias={bias} M={m}"
            try:
                kernel, _la = _compile(name, 1000, 1536, m, dtype, qt, nested, bs, bias)
                _sass, usage = sc.disassemble(kernel.asm["cubin"])
                print(f"variant {desc}: ok (registers {usage.get('REG')}, stack {usage.get('STACK')} B, shared "
                      f"{kernel.metadata.shared} B)", flush=True)  # fmt: skip
            except Exception as exc:
                print(f"variant {desc}: COMPILE ERROR {type(exc).__name__}: {str(exc)[-2000:]}", flush=True)
                fails += 1
    return fails


# ---------------------------------------------------------------------------------------------------------
# GPU: checks and timing


def _weight(n, k, dtype, gen, bs=64, qt="nf4", nested=True):
    import tritonbits

    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(dtype)
    packed, qs = tritonbits.quantize_4bit(w, blocksize=bs, quant_type=qt, compress_statistics=nested)
    return packed, qs


def check_cases(names: list[str], gen) -> int:
    """The prototype against the exact dequantized product on small, awkward problems; returns failures. Ablations
    (timing only) are not checked."""
    names = [nm for nm in names if not CONFIGS[nm][4]]
    import tritonbits
    from tritonbits.quant_state import prepare
    from tritonbits_harness.tolerance import assert_matmul

    cases = [  # dtype, quant type, nested, blocksize, M, N, K, bias
        (torch.bfloat16, "nf4", True, 64, 256, 1024, 1024, False),
        (torch.bfloat16, "nf4", True, 64, 256, 1000, 2048, True),
        (torch.bfloat16, "nf4", True, 64, 100, 4096, 1024, True),
        (torch.bfloat16, "fp4", False, 128, 256, 512, 512, False),
        (torch.float16, "nf4", True, 256, 200, 768, 768, True),
        (torch.bfloat16, "nf4", True, 64, 300, 640, 1536, False),  # two batch-row tiles
    ]
    fails = 0
    for dtype, qt, nested, bs, m, n, k, with_bias in cases:
        packed, qs = _weight(n, k, dtype, gen, bs, qt, nested)
        w, wd = prepare(packed, qs), tritonbits.dequantize_4bit(packed, qs)
        x = torch.randn(m, k + 64 * with_bias, device="cuda", dtype=dtype, generator=gen)[:, :k]  # wider rows too
        bias = torch.randn(n, device="cuda", dtype=dtype, generator=gen) if with_bias else None
        bad = []
        for name in names:
            try:
                out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
                forward(x, w, bias, name, out)
                torch.cuda.synchronize()
                assert_matmul(out, x, wd, bias)
            except Exception as exc:  # a probe: log and go on
                bad.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
        fails += len(bad)
        print(f"check {dtype} {qt} nested={nested} bs{bs} M={m} N={n} K={k} bias={with_bias}: "
              + ("ok" if not bad else "FAIL " + " | ".join(bad)), flush=True)  # fmt: skip
    return fails


def _graph_ms(fn, rep: int) -> float:
    with torch.cuda.stream(torch.cuda.Stream()):
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))


def bench(names: list[str], shapes: list[tuple[int, int]], m: int, rep: int, rounds: int, skip_check: bool,
          gen) -> tuple[list[dict], int]:  # fmt: skip
    import tritonbits
    from tritonbits.quant_state import prepare
    from tritonbits_harness.tolerance import assert_matmul

    dtype = torch.bfloat16
    rows, fails = [], 0
    for k, n in shapes:
        packed, qs = _weight(n, k, dtype, gen)
        w, wd = prepare(packed, qs), tritonbits.dequantize_4bit(packed, qs)
        x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
        fns = {"op": partial(tritonbits.linear_4bit, x, packed, qs),
               "dense": partial(torch.nn.functional.linear, x, wd)}  # fmt: skip
        for name in names:
            out = torch.empty(m, n, dtype=dtype, device="cuda")
            p = plan(x, w, None, out, name)
            try:
                run_plan(p)
                torch.cuda.synchronize()
                if not skip_check and not CONFIGS[name][4]:  # an ablation is wrong by design: timing only
                    assert_matmul(out, x, wd)
            except Exception as exc:  # a probe: log and go on
                print(f"K={k} N={n} M={m} {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                fails += 1
                continue
            fns["ws " + name] = partial(run_plan, p)
        if not skip_check:
            try:
                assert_matmul(tritonbits.linear_4bit(x, packed, qs), x, wd)
            except Exception as exc:
                print(f"K={k} N={n} M={m} op: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                fails += 1
        times: dict[str, list[float]] = {nm: [] for nm in fns}
        for _ in range(rounds):  # interleaved rounds: drift hits every variant alike
            for nm, fn in fns.items():
                times[nm].append(_graph_ms(fn, rep) * 1e3)
        med = {nm: statistics.median(v) for nm, v in times.items()}
        ws_names = [nm for nm in med if nm.startswith("ws ") and not CONFIGS[nm[3:]][4]]  # (not the ablations)
        best = min(ws_names, key=med.get) if ws_names else None
        print(f"K={k:5d} N={n:5d} M={m}: op {med['op']:.2f} us, dense {med['dense']:.2f} us"
              + (f", best prototype {best[3:]} {med[best]:.2f} us: op / best {med['op'] / med[best]:.3f}, "
                 f"dense / best {med['dense'] / med[best]:.3f}, op / dense {med['op'] / med['dense']:.3f}"
                 if best else ""), flush=True)  # fmt: skip
        print(f"  {'variant':<14} {'median us':>10} {'x op':>7} {'x dense':>8}   rounds", flush=True)
        for nm, v in med.items():
            ablation = nm.startswith("ws ") and bool(CONFIGS[nm[3:]][4])
            print(f"  {nm:<14} {v:>10.2f} {med['op'] / v:>7.3f} {med['dense'] / v:>8.3f}   "
                  + " ".join(f"{t:.1f}" for t in times[nm]) + ("   (timing only)" if ablation else ""),
                  flush=True)  # fmt: skip
            rows.append({"k": k, "n": n, "m": m, "bm": BM_, "dtype": "bf16", "name": nm, "us": v,
                         "rounds": times[nm], "checked": nm.startswith("ws ") and not ablation and not skip_check,
                         "timing_only": ablation})  # fmt: skip
        del packed, qs, w, wd
    return rows, fails


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile-only", action="store_true", help="compile offline for sm90 (no GPU) and print counts")
    ap.add_argument("--dump", type=Path, default=None, help="--compile-only: write .sass/.ptx/.ttgir here")
    ap.add_argument("--compile-shape", default="4096x14336", help="--compile-only: KxN of the planned weight")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--shapes", default=SHAPES, help="KxN,KxN,...")
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--bm", type=int, default=256, choices=(128, 256), help="batch rows a program")
    ap.add_argument("--rep", type=int, default=20, help="do_bench_cudagraph's rep (ms) a round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.check_only and args.skip_check:
        ap.error("--check-only and --skip-check exclude each other")
    global BM_
    BM_ = args.bm
    names = [s for s in args.configs.split(",") if s]
    for nm in names:
        if nm not in CONFIGS:
            ap.error(f"unknown config {nm!r} (of {', '.join(CONFIGS)})")
    if args.compile_only:
        os.environ["TRITON_INTERPRET"] = "0"
        kk, nn = (int(v) for v in args.compile_shape.lower().split("x"))
        raise SystemExit(1 if compile_only(names, args.dump, (kk, nn)) else 0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()} triton {triton.__version__}", flush=True)
    fails = 0
    if not args.skip_check:
        fails = check_cases(names, gen)
        print(f"checks: {fails} failures", flush=True)
        if args.check_only:
            raise SystemExit(1 if fails else 0)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    t0 = time.time()
    rows, bfails = bench(names, shapes, args.m, args.rep, args.rounds, args.skip_check, gen)
    what = "launch failures (--skip-check: nothing checked)" if args.skip_check else "failures (checks and launches)"
    print(f"[{time.time() - t0:.0f} s] at the timed shapes: {bfails} {what}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    raise SystemExit(1 if fails or bfails else 0)


if __name__ == "__main__":
    main()

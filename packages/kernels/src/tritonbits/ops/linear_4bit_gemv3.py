"""linear_4bit's "gemv3" kernel (M = 1): a per-block lookup table held in the lanes of a half-warp.

Written in Gluon (Triton's explicit-layout dialect, `triton.experimental.gluon`) because the algorithm depends on
which lane holds which element, which plain Triton leaves to its layout passes. The layout
`L = [1, RPT, 1] per thread x [1, 2, 16] lanes x [1, WARPS, 1] warps` over a row step's
`[NBLK blocks, ROWS rows, 16 units]` tile: the 16 lanes of a half-warp hold the 16 units of ONE quantization
block of ONE row (a unit is BLOCKSIZE / 16 weights: a uint16 at blocksize 64, an int32 at 128), the block's index
runs in registers. So, per (row, block), lane l computes one entry of the block's table,
`to_wdtype(ftz(code[l] * absmax))` (one multiply and one conversion), and every weight is then one shift, one
shuffle from the half-warp (`shfl.sync.idx` on the table register, the nibble as the lane) and one FFMA; gemv2
spends a multiply and a conversion on every weight. The block's absmax is computed once per half-warp (lane j
decodes block j's, nested or not) and handed out by a shuffle.

GPU only (no interpreter: Gluon has none; inline PTX); the op uses it on CUDA sm80+ with a Triton whose Gluon it
was run on (`AVAILABLE`), else gemv2. Sum order: per lane, the unit's products in K order, then the lane's blocks
(in-thread), then the 16 lanes (butterfly).
"""

from __future__ import annotations

import triton

try:  # Gluon: triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # pragma: no cover - the CPU toolchain has Gluon too
    gluon = gl = None

# NOTE: the Triton versions this kernel has run on (GPU tests and benchmarks: Triton 3.6 on the H100/H200 machine);
# Gluon is experimental and changes between releases, so any other version takes gemv2
TESTED_TRITON = ("3.6",)
AVAILABLE = gluon is not None and any(triton.__version__.startswith(v) for v in TESTED_TRITON)
MAX_NBLK = 16  # lane j of a half-warp decodes block j's absmax: at most 16 blocks a chunk
UNIT_NIBBLES = {64: 4, 128: 8}  # blocksize -> weights a lane holds of a block (a uint16, an int32)


def unit_asm(w_dtype: int, nibbles: int) -> str:
    """PTX: one lane's unit `$1` of a block -> `$0` = sum_e w_e * x_e (e in K order), w_e = table[nibble e] taken by
    shfl from the half-warp, where lane l's table entry is to_wdtype(ftz(code[l] * absmax)) ($4: this lane's
    code[l]); absmax is lane $3's `$2` (the half-warp's absmax holder for this block); $5.. are x_e as fp32.
    bnb's byte j holds elements 2j (high nibble) and 2j + 1 (low). w_dtype: 0 fp32, 1 fp16, 2 bf16 (`_W_CODE`)."""
    lines = ["{", ".reg .b32 t, s, w, z;", ".reg .b16 h;", "mov.b32 z, 0;",
             "shfl.sync.idx.b32 t, $2, $3, 0x100f, -1;", "mul.rn.ftz.f32 t, $4, t;"]  # fmt: skip
    if w_dtype == 2:
        lines.append("cvt.rn.bf16x2.f32 t, t, z;")  # the rounded entry's fp32 bits (high half), zeros below
    elif w_dtype == 1:
        lines += ["cvt.rn.f16.f32 h, t;", "cvt.f32.f16 t, h;"]
    for e in range(nibbles):
        shift = 8 * (e // 2) + (4 if e % 2 == 0 else 0)
        src = "$1"
        if shift:
            lines.append(f"shr.u32 s, $1, {shift};")
            src = "s"
        lines.append(f"shfl.sync.idx.b32 w, t, {src}, 0x100f, -1;")
        lines.append(f"mul.rn.f32 $0, w, ${5 + e};" if e == 0 else f"fma.rn.f32 $0, w, ${5 + e}, $0;")
    lines.append("}")
    return " ".join(lines)


_LANE_CODE_ASM = (
    "{ .reg .b32 l; .reg .b64 a; mov.u32 l, %laneid; and.b32 l, l, 15; mad.wide.u32 a, l, 4, $1; "
    "ld.global.nc.b32 $0, [a]; }"
)
_MUL_ADD_ASM = "{ .reg .f32 t; mul.rn.ftz.f32 t, $1, $2; add.rn.f32 $0, t, $3; }"  # bnb's nested absmax

if gl is not None:
    _LANE_CODE = gl.constexpr(_LANE_CODE_ASM)
    _MUL_ADD = gl.constexpr(_MUL_ADD_ASM)

    @gluon.jit
    def _unit(u, am, bidx, lane_code, x, ASM: gl.constexpr, NIB: gl.constexpr):
        """One unit's products (unit_asm's PTX, chosen by the launch for W's dtype and NIB)."""
        if NIB == 4:
            return gl.inline_asm_elementwise(ASM, "=r,r,r,r,r,r,r,r,r", [u, am, bidx, lane_code, x[0], x[1], x[2],
                                             x[3]], dtype=gl.float32, is_pure=True, pack=1)  # fmt: skip
        else:
            return gl.inline_asm_elementwise(ASM, "=r,r,r,r,r,r,r,r,r,r,r,r,r", [u, am, bidx, lane_code, x[0], x[1],
                                             x[2], x[3], x[4], x[5], x[6], x[7]], dtype=gl.float32, is_pure=True,
                                             pack=1)  # fmt: skip

    @gluon.jit
    def _x_unit(x_ptr, col, stride_xk, NIB: gl.constexpr):
        """x[col + e] as fp32, e < NIB (a tuple: one tensor per element of the unit)."""
        x0 = gl.load(x_ptr + (col + 0) * stride_xk).to(gl.float32)
        x1 = gl.load(x_ptr + (col + 1) * stride_xk).to(gl.float32)
        x2 = gl.load(x_ptr + (col + 2) * stride_xk).to(gl.float32)
        x3 = gl.load(x_ptr + (col + 3) * stride_xk).to(gl.float32)
        if NIB == 4:
            return (x0, x1, x2, x3)
        else:
            x4 = gl.load(x_ptr + (col + 4) * stride_xk).to(gl.float32)
            x5 = gl.load(x_ptr + (col + 5) * stride_xk).to(gl.float32)
            x6 = gl.load(x_ptr + (col + 6) * stride_xk).to(gl.float32)
            x7 = gl.load(x_ptr + (col + 7) * stride_xk).to(gl.float32)
            return (x0, x1, x2, x3, x4, x5, x6, x7)

    @gluon.jit
    def _step_loads(units_ptr, absmax_ptr, absmax2_ptr, rows, UNITS_PER_ROW, BLOCKS_PER_ROW, kb0, b, j, jb,
                    BLOCKSIZE2: gl.constexpr, NESTED: gl.constexpr):  # fmt: skip
        """A row step's loads: the units [NBLK, ROWS, 16]; lane j's absmax of block jb (the uint8 code, nested, or
        the fp32 absmax) [1, ROWS, 16]; nested, the row chunk's absmax2 [1, ROWS, 1] (a chunk never straddles a
        nested group), else 0."""
        qb = rows * BLOCKS_PER_ROW + kb0  # the chunk's first block
        row_units = units_ptr + rows.to(gl.int64) * UNITS_PER_ROW + kb0 * 16
        u = gl.load(row_units + j + b * 16, eviction_policy="evict_first").to(gl.int32)
        if NESTED:
            q = gl.load(absmax_ptr + (qb + jb)).to(gl.int32)
            a2 = gl.load(absmax2_ptr + qb.to(gl.uint32) // BLOCKSIZE2)
        else:
            q = gl.load(absmax_ptr + (qb + jb))
            a2 = 0.0
        return u, q, a2

    @gluon.jit
    def linear_4bit_gemv3_kernel(
        x_ptr, units_ptr, absmax_ptr, table_ptr, code2_ptr, absmax2_ptr, offset_ptr, bias_ptr, out_ptr,
        N, UNITS_PER_ROW, BLOCKS_PER_ROW, stride_xk, rows_per_program,
        NIB: gl.constexpr, NBLK: gl.constexpr, RPT: gl.constexpr, WARPS: gl.constexpr, BLOCKSIZE2: gl.constexpr,
        NESTED: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr, ASM: gl.constexpr,
    ):  # fmt: skip
        """out[n] (M = 1) over the K chunk pid_k: NBLK blocks of 16 * NIB columns. Program (pid_n, pid_k) walks W
        rows [pid_n * rows_per_program, ...) in steps of ROWS = RPT * 2 * WARPS; x's chunk stays in registers.
        Rows past N re-read row N - 1 (no masks in the loop) and are not stored. SPLIT: the fp32 partial into
        the workspace [S, 1, N]; else + bias, rounded once into out. Block indices are int32 (the launch checks
        N * BLOCKS_PER_ROW < 2**31), unit offsets int64."""
        ROWS: gl.constexpr = RPT * 2 * WARPS
        L: gl.constexpr = gl.BlockedLayout([1, RPT, 1], [1, 2, 16], [1, WARPS, 1], [2, 1, 0])
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        kb0 = pid_k * NBLK  # the chunk's first block in a row
        b = gl.expand_dims(gl.expand_dims(gl.arange(0, NBLK, layout=gl.SliceLayout(1, gl.SliceLayout(2, L))), 1), 2)
        r = gl.expand_dims(gl.expand_dims(gl.arange(0, ROWS, layout=gl.SliceLayout(0, gl.SliceLayout(2, L))), 0), 2)
        j = gl.expand_dims(gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, L))), 0), 1)
        col = ((kb0 + b) * (16 * NIB) + NIB * j).to(gl.int64)  # [NBLK, 1, 16]: the unit's first column
        x = _x_unit(x_ptr, col, stride_xk, NIB)
        lane_code = gl.inline_asm_elementwise(_LANE_CODE, "=r,l", [table_ptr + j * 0], dtype=gl.float32,
                                              is_pure=True, pack=1)  # fmt: skip
        bidx = b + j * 0  # [NBLK, 1, 16]: the lane (of the half-warp) holding block b's absmax
        jb = j % NBLK  # the block whose absmax lane j decodes
        rr0 = gl.arange(0, ROWS, layout=gl.SliceLayout(1, gl.SliceLayout(0, L)))
        row_lo = pid_n * rows_per_program
        row_hi = gl.minimum(row_lo + rows_per_program, N)
        off = 0.0
        if NESTED:
            off = gl.load(offset_ptr)
        # NOTE: each step's units and absmax are loaded two steps ahead (rows clamped: the loads past the last
        # step read row N - 1). Loaded at the top of the step itself, ptxas issued some unit loads after the absmax
        # chain's wait (two DRAM round trips a step); one step ahead, it put the loads after the step's decode,
        # just before the next step used them.
        u1, q1, a21 = _step_loads(
            units_ptr,
            absmax_ptr,
            absmax2_ptr,
            gl.minimum(row_lo + r, N - 1),
            UNITS_PER_ROW,
            BLOCKS_PER_ROW,
            kb0,
            b,
            j,
            jb,
            BLOCKSIZE2,
            NESTED,
        )
        u2, q2, a22 = _step_loads(
            units_ptr,
            absmax_ptr,
            absmax2_ptr,
            gl.minimum(row_lo + ROWS + r, N - 1),
            UNITS_PER_ROW,
            BLOCKS_PER_ROW,
            kb0,
            b,
            j,
            jb,
            BLOCKSIZE2,
            NESTED,
        )
        for r0 in range(row_lo, row_hi, ROWS):
            u, q, a2 = u1, q1, a21
            u1, q1, a21 = u2, q2, a22
            u2, q2, a22 = _step_loads(
                units_ptr,
                absmax_ptr,
                absmax2_ptr,
                gl.minimum(r0 + 2 * ROWS + r, N - 1),
                UNITS_PER_ROW,
                BLOCKS_PER_ROW,
                kb0,
                b,
                j,
                jb,
                BLOCKSIZE2,
                NESTED,
            )
            if NESTED:
                am = gl.inline_asm_elementwise(_MUL_ADD, "=r,r,r,r", [gl.load(code2_ptr + q), a2, off],
                                               dtype=gl.float32, is_pure=True, pack=1)  # fmt: skip
            else:
                am = q
            acc = _unit(u, am, bidx, lane_code, x, ASM, NIB)
            total = gl.sum(gl.sum(acc, axis=0), axis=1)  # [ROWS]: the lane's blocks, then the half-warp
            rr = r0 + rr0
            ok = rr < row_hi
            if SPLIT:
                gl.store(out_ptr + pid_k.to(gl.int64) * N + rr, total, mask=ok)
            else:
                if HAS_BIAS:
                    total += gl.load(bias_ptr + rr, mask=ok, other=0.0).to(gl.float32)
                gl.store(out_ptr + rr, total.to(out_ptr.dtype.element_ty), mask=ok)
else:  # pragma: no cover
    linear_4bit_gemv3_kernel = None

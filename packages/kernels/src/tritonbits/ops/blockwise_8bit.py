"""8-bit blockwise quantization with a 256-entry code (bnb's dynamic code by default), byte-equal with bnb CUDA.

    absmax[b] = max |x| over block b (NaN ignored)                          one fp32 per `blocksize` values
    q[i]      = dQuantize(code, fl(x[i] * fl(1 / absmax[i // blocksize])))  bnb's binary search, below
    x'[i]     = to_dtype(fl(code[q[i]] * absmax[i // blocksize]))           dequantize, round to nearest even

dQuantize (bnb csrc kernels.cu): a 7-step binary search over the sorted code from pivot 127 (steps 64..1,
going up when x > code[pivot]), remembering the last pivots above and below; then the nearest of the final
pivot and its neighbour by fp32 midpoints `(a + b) * 0.5`: above the final pivot, strictly greater than the
midpoint goes up; below it, strictly less than the midpoint goes down. Before the search `lower = -1` and
`upper = 1` stand for the ends, replaced by code[0] / code[255] when the search never left them. NaN
compares false everywhere: code 0.

One launch each way (nested=True: quantize + torch mean + a second quantize launch that subtracts the mean
itself; dequantize + torch add + dequantize, as bnb). The 4-bit quantizer's nested step reuses
`launch_quantize` with `offset` (tritonbits/ops/quantize_4bit.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _runtime, formats
from .._launcher import BoundLaunch, CachedLauncher
from .._triton_helpers import FLT_MIN, gather, mul_ftz, reciprocal, store_float
from ..quant_state import NestedState, QuantState, _check_state2_fields, _int, check_tensor

FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)  # float32 max, exact

# NOTE: a program quantizes max(1, TILE // blocksize) whole blocks (rows), so that every block's absmax is
# one row reduction. The search encoder runs at 15-25% of a copy (its 7 steps are the limit); the table encoder
# is measured below (ENCODERS).
TILE = 4096
# NOTE: dequantize: a program of DEQUANT_WARPS warps writes DEQUANT_TILE values; a tile inside one block loads
# its absmax once (before: one load a value, bf16 2**26 at 88.6% of a copy, ci/kernel_breakdown.py). Swept with
# that change on an H100 (ci/dequantize_blockwise_probe.py, log docs/gpu-runs/logs/20261123T1931Z-nvidia-h100-
# dequantize-blockwise-probe.txt; tile 1024-8192 x 2/4/8 warps, CUDA graphs, blocksize 4096): (2048, 4) gives
# bf16 95.5% / 97.5% of a copy at 2**26 / 2**28 and fp32 95.4% / 96.4%, within 1% of each case's best.
DEQUANT_TILE = 2048
DEQUANT_WARPS = 4
# NOTE: small launches (the nested absmax of quantize_4bit: 262K values at 4096x4096, blocksize 256) take
# fewer rows a program until there are MIN_PROGRAMS programs (at 16 rows, 64 programs for 132 SMs). Not
# measured yet: ci/quantize_probe.py times the nested path's steps.
MIN_PROGRAMS = 1024


@triton.jit
def block_absmax(x):
    """max |x| of each row of a [ROWS, B] fp32 tile: NaN ignored like bnb's fmaxf; a row of NaN only gives
    -FLT_MAX (bnb's starting value). Masked-out elements must be loaded as 0 (bnb pads with 0 too)."""
    a = tl.where(x != x, -FLT_MAX, tl.abs(x))
    return tl.max(a, axis=1)


@triton.jit
def dquantize_8bit(x, code_ptr):
    """bnb's dQuantize<0> on fp32 values x: the index (int32) of the code entry chosen."""
    pivot = tl.full(x.shape, 127, tl.int32)
    upper_pivot = tl.full(x.shape, 255, tl.int32)
    lower_pivot = tl.zeros(x.shape, tl.int32)
    lower = tl.full(x.shape, -1.0, tl.float32)
    upper = tl.full(x.shape, 1.0, tl.float32)
    val = tl.load(code_ptr + pivot)
    for k in tl.static_range(7):  # pivot moves by 64, 32, ..., 1
        up = x > val
        lower_pivot = tl.where(up, pivot, lower_pivot)
        lower = tl.where(up, val, lower)
        upper_pivot = tl.where(up, upper_pivot, pivot)
        upper = tl.where(up, upper, val)
        pivot = tl.where(up, pivot + (64 >> k), pivot - (64 >> k))
        val = tl.load(code_ptr + pivot)
    upper = tl.where(upper_pivot == 255, tl.load(code_ptr + 255), upper)
    lower = tl.where(lower_pivot == 0, tl.load(code_ptr), lower)
    above = x > val
    go_up = x > (upper + val) * 0.5
    go_down = x < (lower + val) * 0.5
    return tl.where(above, tl.where(go_up, upper_pivot, pivot), tl.where(go_down, lower_pivot, pivot))


@triton.jit
def encode_8bit_table(x, table_ptr, LO: tl.constexpr, HI: tl.constexpr, SHIFT: tl.constexpr, NEG: tl.constexpr,
                      FTZ: tl.constexpr):  # fmt: skip
    """dQuantize<0> with the dynamic code as one table load and one compare (table: dynamic_table below):
    key = clamp(|bits|, LO, HI) - LO, complemented for negative x (an int32 monotone in x); the entry of
    bucket key >> SHIFT holds the count of thresholds in lower buckets (low 8 bits) and the low SHIFT bits
    of the bucket's one threshold key (2**SHIFT - 1 if none). NaN: index 0. FTZ: how the table is read
    (_triton_helpers.gather)."""
    bits = x.to(tl.int32, bitcast=True)
    key = (tl.minimum(tl.maximum(bits & 0x7FFFFFFF, LO), HI) - LO) ^ (bits >> 31)
    entry = gather(table_ptr + ((key >> SHIFT) + NEG), FTZ)
    code = (entry & 0xFF) + ((key & ((1 << SHIFT) - 1)) > (entry >> 8)).to(tl.int32)
    return tl.where(x != x, 0, code)


@triton.jit
def _quantize_blockwise_kernel(
    x_ptr, offset_ptr, code_ptr, out_ptr, absmax_ptr, n_elements, n_blocks, code_src_ptr, code_out_ptr,
    BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, SUB_OFFSET: tl.constexpr, RCP: tl.constexpr,
    TABLE: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, SHIFT: tl.constexpr, NEG: tl.constexpr,
    FTZ: tl.constexpr, WRITE_CODE: tl.constexpr,
):  # fmt: skip
    """One program quantizes ROWS whole blocks of BLOCKSIZE values (int64 base, int32 within the tile).
    SUB_OFFSET: quantize fl(x - offset[0]) instead of x (the nested step's `absmax - mean`, one fp32 rounding
    as torch's subtraction). TABLE: code_ptr is the dynamic code's bucket table (encode_8bit_table), else the
    256-entry code itself (bnb's binary search). WRITE_CODE: program 0 also copies the 256-entry code
    (code_src_ptr) to code_out_ptr, the quant state's own copy, which would otherwise take a launch (a clone)."""
    base = tl.program_id(0).to(tl.int64) * (ROWS * BLOCKSIZE)
    rows = tl.arange(0, ROWS)
    local = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    left = tl.minimum(n_elements - base, ROWS * BLOCKSIZE).to(tl.int32)
    mask = local < left
    x = tl.load(x_ptr + base + local, mask=mask, other=0.0).to(tl.float32)
    if SUB_OFFSET:
        x = tl.where(mask, x - tl.load(offset_ptr), 0.0)
    absmax = block_absmax(x)
    # fast math (bnb): fabsf/fmaxf flush subnormals, so an absmax below 2**-126 is 0; x * r is mul.ftz, so such a
    # block's values are 0 * inf = NaN (index 0), and a subnormal x or product scales to a signed zero
    absmax = tl.where((absmax > 0) & (absmax < FLT_MIN), 0.0, absmax)
    block = tl.program_id(0).to(tl.int64) * ROWS + rows
    tl.store(absmax_ptr + block, absmax, mask=block < n_blocks)
    scaled = mul_ftz(x, reciprocal(absmax, RCP)[:, None], FTZ)
    q = encode_8bit_table(scaled, code_ptr, LO, HI, SHIFT, NEG, FTZ) if TABLE else dquantize_8bit(scaled, code_ptr)
    tl.store(out_ptr + base + local, q.to(tl.uint8), mask=mask)
    if WRITE_CODE:  # noqa: SIM102 (a constexpr branch around a runtime one) program 0 copies the code to the state
        if tl.program_id(0) == 0:
            c = tl.arange(0, 256)
            tl.store(code_out_ptr + c, tl.load(code_src_ptr + c))


@triton.jit
def _dequantize_blockwise_kernel(
    q_ptr, absmax_ptr, code_ptr, out_ptr, n_elements,
    BLOCKSIZE: tl.constexpr, TILE_: tl.constexpr, MANUAL_BF16: tl.constexpr, FTZ: tl.constexpr,
):  # fmt: skip
    """out[i] = code[q[i]] * absmax[i // BLOCKSIZE], one fp32 product (bnb's mul.ftz: below 2**-126 a signed
    zero), then one rounding to out's dtype. A tile inside one block (TILE_ divides BLOCKSIZE) loads its absmax
    once, else one per element."""
    base = tl.program_id(0).to(tl.int64) * TILE_
    local = tl.arange(0, TILE_)
    mask = local < tl.minimum(n_elements - base, TILE_).to(tl.int32)
    q = tl.load(q_ptr + base + local, mask=mask, other=0).to(tl.int32)
    if BLOCKSIZE % TILE_ == 0:
        absmax = tl.load(absmax_ptr + base // BLOCKSIZE)
    else:
        absmax = tl.load(absmax_ptr + (base + local) // BLOCKSIZE, mask=mask, other=0.0)
    store_float(out_ptr + base + local, mul_ftz(tl.load(code_ptr + q), absmax, FTZ), mask, MANUAL_BF16, "")


# NOTE: the block reciprocal 1/absmax, as bnb's --use_fast_math build computes it (rcp.approx.ftz.f32): with
# Triton's own division, 14336x4096 fp32 NF4 input differed from bnb in some bytes (H100, 2026-11-23); the
# choice is measured by ci/quantize_rcp_probe.py (record in docs/gpu-runs/logs/). The interpreter runs no PTX:
# there the reciprocal is correctly rounded, as in the numpy oracle.
RCP_GPU = "approx"
RCP_MODES = ("approx", "ieee", "plain")


def rcp_mode(device: torch.device, rcp: str | None = None) -> str:
    """The reciprocal a quantize kernel uses on `device` (an explicit `rcp` is for the probe and tests)."""
    if rcp is not None:
        if rcp not in RCP_MODES:
            raise ValueError(f"rcp must be one of {RCP_MODES}, got {rcp!r}")
        if rcp != "plain" and _runtime.INTERPRET:
            raise ValueError(f"rcp={rcp!r} needs a GPU: the Triton interpreter runs no PTX")
        return rcp
    return "plain" if device.type != "cuda" else RCP_GPU


# ---------------------------------------------------------------------------------------------------
# The dynamic code's bucket table (encode_8bit_table). NOTE: SHIFT=17 is the largest shift that keeps one
# threshold a bucket (64 buckets an octave; the thresholds of [0.1, 1] are 0.0141 apart, a bucket of [0.5, 1)
# is 2**-7 wide): 2946 int32 entries, 11.5 KiB.
TABLE_SHIFT = 17
TABLE_LO = 0x34000000  # 2**-23: every |x| below it has the code of 0 (the smallest |threshold| is 2.7e-7)
TABLE_HI = 0x3F800000  # 1.0: every threshold lies below it, so larger |x| clamp to it
TABLE_NEG = ((TABLE_HI - TABLE_LO) >> TABLE_SHIFT) + 1  # buckets of negative keys

_TABLES: dict[torch.device, torch.Tensor] = {}


def dquantize_thresholds(code: torch.Tensor) -> torch.Tensor:
    """The 255 fp32 thresholds t of bnb's dQuantize<0> on a sorted code of distinct values: the index chosen for
    x is #{k : x > t[k]} (NaN: 0). The search ends on an even pivot p with code[p-1] < x <= code[p+1] (the
    in-order neighbours of a leaf are its ancestors) and picks by the fp32 midpoint m[k] = fl(code[k] +
    code[k+1]) * 0.5: a tie goes to the even index, so t[k] = m[k] for even k and the fp32 just below m[k] for
    odd k (x >= m[k] there)."""
    mids = (code[:-1] + code[1:]) * 0.5
    below = torch.nextafter(mids, torch.tensor(float("-inf")))
    return torch.where(torch.arange(255) % 2 == 1, below, mids)


def table_key(x: torch.Tensor) -> torch.Tensor:
    """The kernel's int32 key of fp32 values, with the same integer operations (monotone in x)."""
    bits = x.view(torch.int32)
    return ((bits & 0x7FFFFFFF).clamp(TABLE_LO, TABLE_HI) - TABLE_LO) ^ (bits >> 31)


def dynamic_table() -> torch.Tensor:
    """int32[2 * TABLE_NEG] on the CPU: per bucket b (key >> TABLE_SHIFT, offset by TABLE_NEG), the number of
    thresholds in lower buckets | (the low TABLE_SHIFT bits of its one threshold's key, or all ones) << 8."""
    code = formats.dynamic_code()
    if not bool((code[1:] > code[:-1]).all()):
        raise AssertionError("the dynamic code must be sorted and distinct")
    t = dquantize_thresholds(code)
    if not bool((t.abs().view(torch.int32) > TABLE_LO).all() and (t.abs().view(torch.int32) < TABLE_HI).all()):
        raise AssertionError("a threshold lies outside the table's clamp range")
    key = table_key(t)
    buckets = (key >> TABLE_SHIFT) + TABLE_NEG
    if not bool((buckets[1:] > buckets[:-1]).all()):
        raise AssertionError(f"two thresholds share a bucket at TABLE_SHIFT={TABLE_SHIFT}")
    mask = (1 << TABLE_SHIFT) - 1
    nb = 2 * TABLE_NEG
    low = torch.full((nb,), mask, dtype=torch.int64)
    low[buckets.long()] = (key & mask).long()
    base = torch.searchsorted(buckets.long(), torch.arange(nb), right=False)  # thresholds in lower buckets
    return (base | low << 8).to(torch.int32)


def table_for(code: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The bucket table when `code` is tritonbits' own dynamic code tensor on `device` (the default), else None
    (another code, or a copy: the binary search, whose result for any code is bnb's)."""
    if code is not formats.code_table("dynamic", device):
        return None
    table = _TABLES.get(device)
    if table is None:
        table = _TABLES[device] = dynamic_table().to(device)
    return table


# ---------------------------------------------------------------------------------------------------
# NOTE: the default for the dynamic code is "table" (one gather a value from the 11.5 KiB bucket table, L1-resident).
# Until the table's gather went through inline PTX (_triton_helpers.gather) it lost to an "smem" encoder (the table
# looked up with tl.gather from shared memory by a persistent kernel, 1.4-1.6x faster on the H100 and the H200):
# triton 3.6 converted every value to and from the gather's own layout through shared memory (42-50 shared round
# trips a program, 122-128 registers). With the PTX gather (76 registers, 1-2 round trips) the table encoder beat
# smem in one run on an H100 (ci/quantize_probe.py, log docs/gpu-runs/logs/20261123T1947Z-nvidia-h100-quantize-
# probe-gather.txt; 2**26 values, blocksize 4096, CUDA graphs): bf16 95.8 vs 102.1 us, fp16 93.7 vs 100.1, fp32
# 114.8 vs 118.6 (71.4 / 72.8 / 97.9% of a copy), and smem was removed.
ENCODERS = ("table", "search")


_quantize_launcher = CachedLauncher(_quantize_blockwise_kernel)
_dequantize_launcher = CachedLauncher(_dequantize_blockwise_kernel)


def default_encoder(code: torch.Tensor, device: torch.device) -> str:
    """ "table" for the dynamic code (formats.code_table's tensor, by identity: table_for), else "search"."""
    return "table" if table_for(code, device) is not None else "search"


CODE_SRC_ARG, CODE_OUT_ARG = 7, 8  # plan_quantize()'s args: the positions of the code and of code_out


def plan_quantize(x, code, out, absmax, blocksize: int, offset=None, rcp: str | None = None,
                  encoder: str | None = None, code_out: torch.Tensor | None = None):  # fmt: skip
    """encoder: "table" (the dynamic code's bucket table), "search" (any code), or None for default_encoder.
    The plan is for _quantize_blockwise_kernel. code_out: fp32[256] that the launch fills with `code` (argument
    CODE_OUT_ARG), or None."""
    encoder = encoder or default_encoder(code, x.device)
    n = x.numel()
    rows = max(TILE // blocksize, 1)
    while rows > 1 and _runtime.cdiv(n, rows * blocksize) < MIN_PROGRAMS:
        rows //= 2
    grid = (_runtime.cdiv(n, rows * blocksize), 1, 1)
    table = table_for(code, x.device) if encoder == "table" else None
    if encoder == "table" and table is None:
        raise ValueError("encoder='table' needs the dynamic code (formats.code_table('dynamic', device))")
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    args = (x, offset if offset is not None else absmax, code if table is None else table, out, absmax, n,
            _runtime.cdiv(n, blocksize), code, code_out if code_out is not None else absmax)  # fmt: skip
    constexprs = {"BLOCKSIZE": blocksize, "ROWS": rows, "SUB_OFFSET": offset is not None,
                  "RCP": rcp_mode(x.device, rcp), "TABLE": table is not None, "LO": TABLE_LO, "HI": TABLE_HI,
                  "SHIFT": TABLE_SHIFT, "NEG": TABLE_NEG, "FTZ": _runtime.ftz_mode(x.device),
                  "WRITE_CODE": code_out is not None}  # fmt: skip
    tile = rows * blocksize
    return grid, args, constexprs, {"num_warps": 2 if tile <= 1024 else 4 if tile <= 4096 else 8}


def launch_quantize(x, code, out, absmax, blocksize: int, offset=None, *, kernel_wrap=None, rcp=None,
                    encoder=None) -> None:  # fmt: skip
    """Quantize the flat contiguous `x` into `out` (uint8, x.numel()) and `absmax` (fp32, one per block):
    validated arguments. `offset` (0-d fp32): quantize x - offset. `kernel_wrap`: torch.library.wrap_triton in a
    triton_op's body (applied to the plan's kernel). `encoder`: see plan_quantize."""
    if x.numel() == 0:
        return
    encoder = encoder or default_encoder(code, x.device)
    grid, args, constexprs, options = plan_quantize(x, code, out, absmax, blocksize, offset, rcp, encoder)
    if kernel_wrap is not None:
        kernel_wrap(_quantize_blockwise_kernel)[grid](*args, **constexprs, **options)
    else:
        _quantize_launcher(grid, args, constexprs, options, x.device)


def launch_dequantize(q, absmax, code, out, blocksize: int, *, kernel=None) -> None:
    n = q.numel()
    if n == 0:
        return
    manual_bf16 = out.dtype == torch.bfloat16 and not _runtime.native_bf16_conversion(out.device)
    grid = (_runtime.cdiv(n, DEQUANT_TILE), 1, 1)
    args = (q, absmax, code, out.view(torch.int16) if manual_bf16 else out, n)
    constexprs = {"BLOCKSIZE": blocksize, "TILE_": DEQUANT_TILE, "MANUAL_BF16": manual_bf16,
                  "FTZ": _runtime.ftz_mode(out.device)}  # fmt: skip
    if kernel is not None:
        kernel[grid](*args, **constexprs, num_warps=DEQUANT_WARPS)
    else:
        _dequantize_launcher(grid, args, constexprs, {"num_warps": DEQUANT_WARPS}, out.device)


# ---------------------------------------------------------------------------------------------------
# Validation


def check_input(A, name: str = "A") -> torch.device:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in formats.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32 (bnb quantizes 16/32-bit floats), "
                        f"got {A.dtype}")  # fmt: skip
    return _runtime.check_device(name, A)


def check_blocksize(blocksize, allowed: tuple[int, ...], name: str = "blocksize") -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {blocksize!r}")
    return blocksize


def check_code(code, device) -> torch.Tensor:
    if code is None:
        return formats.code_table("dynamic", device)
    check_tensor("code", code, (torch.float32,), 256, device)
    return code


def _flat(A: torch.Tensor) -> torch.Tensor:
    """A's values in logical (row-major) order as a contiguous 1-d tensor: bnb calls A.contiguous()."""
    return A.reshape(-1) if A.is_contiguous() else A.contiguous().reshape(-1)


# ---------------------------------------------------------------------------------------------------
# torch.library registration (see ops/dequantize_4bit.py for why eager calls launch directly)


@torch.library.custom_op("tritonbits::quantize_blockwise", mutates_args=())
def _quantize_blockwise_op(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = _flat(A)
    out = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(_runtime.cdiv(x.numel(), blocksize), dtype=torch.float32, device=A.device)
    launch_quantize(x, code, out, absmax, blocksize)
    return out, absmax


@_quantize_blockwise_op.register_fake
def _(A, code, blocksize):
    n = A.numel()
    return A.new_empty(A.shape, dtype=torch.uint8), A.new_empty((-(-n // blocksize),), dtype=torch.float32)


@torch.library.custom_op("tritonbits::quantize_blockwise.out", mutates_args=("out", "absmax"))
def _quantize_blockwise_out_op(
    A: torch.Tensor, code: torch.Tensor, blocksize: int, out: torch.Tensor, absmax: torch.Tensor
) -> None:
    launch_quantize(_flat(A), code, out, absmax, blocksize)


@_quantize_blockwise_out_op.register_fake
def _(A, code, blocksize, out, absmax):
    return None


@torch.library.triton_op("tritonbits::quantize_blockwise_triton_op", mutates_args=())
def _quantize_blockwise_triton_op(
    A: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    _runtime.outside_fake(formats.code_table, "dynamic", A.device)  # table_for's identity check reads it
    x = _flat(A)
    out = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(_runtime.cdiv(x.numel(), blocksize), dtype=torch.float32, device=A.device)
    launch_quantize(x, code, out, absmax, blocksize, kernel_wrap=torch.library.wrap_triton)
    return out, absmax


@torch.library.custom_op("tritonbits::dequantize_blockwise", mutates_args=())
def _dequantize_blockwise_op(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    out = torch.empty(A.shape, dtype=dtype, device=A.device)
    launch_dequantize(A, absmax, code, out, blocksize)
    return out


@_dequantize_blockwise_op.register_fake
def _(A, absmax, code, blocksize, dtype):
    return A.new_empty(A.shape, dtype=dtype)


@torch.library.custom_op("tritonbits::dequantize_blockwise.out", mutates_args=("out",))
def _dequantize_blockwise_out_op(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, out: torch.Tensor
) -> None:
    launch_dequantize(A, absmax, code, out, blocksize)


@_dequantize_blockwise_out_op.register_fake
def _(A, absmax, code, blocksize, out):
    return None


@torch.library.triton_op("tritonbits::dequantize_blockwise_triton_op", mutates_args=())
def _dequantize_blockwise_triton_op(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    out = torch.empty(A.shape, dtype=dtype, device=A.device)
    launch_dequantize(A, absmax, code, out, blocksize, kernel=torch.library.wrap_triton(_dequantize_blockwise_kernel))
    return out


@torch.library.custom_op("tritonbits::absmax_mean", mutates_args=())
def _absmax_mean_op(absmax: torch.Tensor) -> torch.Tensor:
    """absmax.mean() as eager torch computes it: the nested offset bnb stores. Traced, Inductor would sum it in
    its own order (1 ulp off for about half of the sizes tried on the CPU), so under torch.compile the mean is
    this opaque op."""
    return absmax.mean()


@_absmax_mean_op.register_fake
def _(absmax):
    return absmax.new_empty(())


def _quantize(A, code, blocksize, out=None, absmax=None):
    """(q, absmax) through the launcher (eager) or a registered op (under torch.compile)."""
    if torch.compiler.is_compiling():
        op = _quantize_blockwise_triton_op if A.device.type == "cuda" else _quantize_blockwise_op
        q, am = op(A, code, blocksize)
        if out is not None:
            q = out.view(A.shape).copy_(q) if out.numel() else out
        if absmax is not None:
            am = absmax.copy_(am)
        return q, am
    x = _flat(A)
    if out is None:
        out = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
    if absmax is None:
        absmax = torch.empty(_runtime.cdiv(x.numel(), blocksize), dtype=torch.float32, device=A.device)
    launch_quantize(x, code, out, absmax, blocksize)
    return out, absmax


def _dequantize(A, absmax, code, blocksize, dtype, out=None):
    if torch.compiler.is_compiling():
        if out is not None:
            _dequantize_blockwise_out_op(A, absmax, code, blocksize, out)
            return out
        op = _dequantize_blockwise_triton_op if A.device.type == "cuda" else _dequantize_blockwise_op
        return op(A, absmax, code, blocksize, dtype)
    if out is None:
        out = torch.empty(A.shape, dtype=dtype, device=A.device)
    launch_dequantize(A, absmax, code, out, blocksize)
    return out


def quantize_blockwise(
    A: torch.Tensor,
    code: torch.Tensor | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> tuple[torch.Tensor, QuantState]:
    """`bitsandbytes.functional.quantize_blockwise`: (uint8 codes shaped like A, QuantState), byte-equal with
    bnb CUDA. code: float32[256] (bnb's dynamic code by default). absmax / out: tensors to write into
    (absmax float32 with one value a block, or uint8 when nested; out uint8 with A's numel, contiguous).
    nested: also quantize the absmax (minus its mean) with the same blocksize, as bnb does.
    Non-contiguous A is quantized in its logical order (bnb calls A.contiguous()). NaN: ignored by the
    block's absmax, quantized to code index 0. One launch (nested: two, with a torch mean between)."""
    if code is None and absmax is None and out is None and not torch.compiler.is_compiling():
        return _eager(A, blocksize, nested)
    device = check_input(A)
    check_blocksize(blocksize, formats.BLOCKSIZES_8BIT)
    _check_nested(nested)
    return _quantize_validated(A, check_code(code, device), absmax, out, blocksize, nested, device)


def _check_nested(nested) -> None:
    if not isinstance(nested, bool):  # as quantize_4bit's compress_statistics
        raise TypeError(f"nested must be a bool, got {type(nested).__name__}")


def _quantize_validated(A, code, absmax, out, blocksize, nested, device) -> tuple[torch.Tensor, QuantState]:
    """quantize_blockwise after its argument checks (the tensors' own checks are here)."""
    n = A.numel()
    blocks = -(-n // blocksize)
    if out is not None:
        check_tensor("out", out, (torch.uint8,), n, device)
        _runtime.check_out(out, {"A": A})
    if absmax is not None:
        check_tensor("absmax", absmax, (torch.uint8,) if nested else (torch.float32,), blocks, device)
        _runtime.check_out(absmax, {"A": A, **({"out": out} if out is not None else {})}, name="absmax")
    q, am = _quantize(A, code, blocksize, out, None if nested else absmax)
    state_code = code.clone()
    if not nested:
        return q, QuantState(absmax=am, shape=A.shape, dtype=A.dtype, blocksize=blocksize,
                             quant_type=None, code=state_code)  # type: ignore[arg-type]  # fmt: skip
    offset = _absmax_mean_op(am) if torch.compiler.is_compiling() else am.mean()
    am -= offset
    qabsmax, absmax2 = _quantize(am, formats.code_table("dynamic", device), blocksize, absmax)
    state2 = NestedState(absmax=absmax2, code=formats.code_table("dynamic", device).clone(), blocksize=blocksize)
    return q, QuantState(absmax=qabsmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize,
                         quant_type=None, code=state_code, offset=offset, state2=state2)  # type: ignore[arg-type]  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Eager quantize_blockwise(A, blocksize=..., nested=...) (no code, absmax or out): validated once per argument
# combination, launched through bound launches. NOTE: as quantize_4bit's _EAGER (see there): _EAGER maps what the
# checks read (A's type, dtype, device and _runtime.INTERPRET; blocksize and nested with their types) to plans
# keyed by the element count and x's address mod 16; every other tensor is a fresh torch.empty, bound as a slot
# with x (the kernel's input, offset stand-in, out, absmax; nested: the second launch's too). Measured host time,
# CPU under stubbed launches (ci/quantize_host_cpu_probe.py --compare, 5 rounds, against c14eaf5; bf16 256x4096
# and 1024x4096, bs4096): 19.5-19.7 -> 7.4 us (0.37-0.38x), nested 42 -> 15.2-15.3 us (0.36x). GPU host time: to
# be measured (ci/quantize_host_probe.py).
EAGER_MAX = 64  # argument combinations kept, each with at most EAGER_MAX plans (oldest dropped first)
_EAGER: dict[tuple, dict[tuple, _EagerPlan]] = {}
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


class _BoundQuantize:
    """launch_quantize(x, the dynamic code, out, absmax, blocksize) of fresh out/absmax tensors: planned and bound
    on its first launch, then the bound launch (input, offset stand-in, out, absmax: args 0, 1, 3, 4)."""

    def __init__(self, blocksize: int, device: torch.device):
        self.blocksize, self.device = blocksize, device
        self.bound: BoundLaunch | None = None
        self.table: torch.Tensor | None = None  # what the bound launch reads besides its slots (kept alive)

    def __call__(self, x: torch.Tensor, out: torch.Tensor, absmax: torch.Tensor) -> None:
        if self.bound is not None and self.bound(x, absmax, out, absmax):
            return
        code = formats.code_table("dynamic", self.device)
        grid, args, constexprs, options = plan_quantize(x, code, out, absmax, self.blocksize, None, None)
        _quantize_launcher(grid, args, constexprs, options, self.device)
        self.bound = _quantize_launcher.bind(grid, args, constexprs, options, self.device, slots=(0, 1, 3, 4))
        self.table = args[2]


class _EagerPlan:
    """The launches of one validated quantize_blockwise call shape (see the NOTE above _EAGER), in
    _quantize_validated's order: quantize; the state's code copy; nested: mean, subtraction, quantize, code copy."""

    def __init__(self, n: int, blocksize: int, nested: bool, device: torch.device):
        self.blocksize, self.nested, self.device = blocksize, nested, device
        self.blocks = -(-n // blocksize)
        self.blocks2 = -(-self.blocks // blocksize)
        self.code = formats.code_table("dynamic", device)  # the states' copies are cloned from it
        self.first = _BoundQuantize(blocksize, device)
        self.second = _BoundQuantize(blocksize, device) if nested else None

    def run(self, A: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, QuantState]:
        device, blocksize = self.device, self.blocksize
        out = torch.empty(A.shape, dtype=torch.uint8, device=device)
        absmax = torch.empty(self.blocks, dtype=torch.float32, device=device)
        self.first(x, out, absmax)
        state_code = self.code.clone()
        if self.second is None:
            return out, QuantState(absmax=absmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize,
                                   quant_type=None, code=state_code)  # type: ignore[arg-type]  # fmt: skip
        offset = absmax.mean()
        absmax -= offset
        qabsmax = torch.empty(self.blocks, dtype=torch.uint8, device=device)
        absmax2 = torch.empty(self.blocks2, dtype=torch.float32, device=device)
        self.second(absmax, qabsmax, absmax2)
        state2 = NestedState(absmax=absmax2, code=self.code.clone(), blocksize=blocksize)
        return out, QuantState(absmax=qabsmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize,
                               quant_type=None, code=state_code, offset=offset, state2=state2)  # type: ignore[arg-type]  # fmt: skip


def _eager(A, blocksize, nested) -> tuple[torch.Tensor, QuantState]:
    """quantize_blockwise(A, blocksize=blocksize, nested=nested), eager (see the NOTE above _EAGER)."""
    plans: dict | None = None
    key: tuple | None = None
    if type(A) in _TENSOR_TYPES:
        key = (type(A), A.dtype, A.device, _runtime.INTERPRET, type(blocksize), blocksize, type(nested), nested)
        try:
            plans = _EAGER.get(key)
        except TypeError:  # an unhashable argument: the checks refuse it
            key = None
    if plans is None:
        check_input(A)
        check_blocksize(blocksize, formats.BLOCKSIZES_8BIT)
        _check_nested(nested)
        plans = {}
        if key is not None:
            _runtime.put_bounded(_EAGER, key, plans, EAGER_MAX)
    device = A.device
    x = _flat(A)
    n = x.numel()
    if n == 0:
        return _quantize_validated(A, formats.code_table("dynamic", device), None, None, blocksize, nested, device)
    shape_key = (n, x.data_ptr() % 16)
    p = plans.get(shape_key)
    if p is None:
        p = _runtime.put_bounded(plans, shape_key, _EagerPlan(n, blocksize, nested, device), EAGER_MAX)
    return p.run(A, x)


def dequantize_blockwise(
    A: torch.Tensor,
    quant_state=None,
    absmax: torch.Tensor | None = None,
    code: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> torch.Tensor:
    """`bitsandbytes.functional.dequantize_blockwise`: values shaped like A in quant_state.dtype (float32
    without a quant_state), equal bit for bit with bnb CUDA. quant_state: bnb's or tritonbits' QuantState
    (its absmax, code, blocksize, dtype, and offset/state2 when nested); without it, absmax (float32) with
    code (default: the dynamic code) and blocksize, as in bnb (`nested` is ignored there, as bnb does)."""
    if quant_state is None and absmax is None:
        raise ValueError("quant_state or absmax is required (dequantize_blockwise needs the block scales)")
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype != torch.uint8:
        raise TypeError(f"A must be uint8 (8-bit codes), got {A.dtype}")
    device = _runtime.check_device("A", A)
    if not A.is_contiguous():
        A = A.contiguous()
    if quant_state is None:
        dtype, offset, state2 = torch.float32, None, None
        code = check_code(code, device)
    else:
        missing = [f for f in ("absmax", "code", "blocksize", "dtype") if not hasattr(quant_state, f)]
        if missing:
            raise TypeError(f"quant_state has no {', '.join(missing)}: pass a QuantState from quantize_blockwise")
        absmax, dtype = quant_state.absmax, quant_state.dtype
        blocksize = _int("quant_state.blocksize", quant_state.blocksize)  # as state2.blocksize and the 4-bit ops
        code = quant_state.code
        check_tensor("quant_state.code", code, (torch.float32,), 256, device)
        offset, state2 = getattr(quant_state, "offset", None), getattr(quant_state, "state2", None)
    check_blocksize(blocksize, formats.BLOCKSIZES, "blocksize" if quant_state is None else "quant_state.blocksize")
    if dtype not in formats.FLOAT_DTYPES:
        raise TypeError(f"quant_state.dtype must be float16, bfloat16 or float32, got {dtype}")
    blocks = -(-A.numel() // blocksize)
    if out is not None:  # before the nested absmax's launch: nothing invalid reaches a kernel
        check_tensor("out", out, (dtype,), None, device)
        if out.shape != A.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(A.shape)} (A's shape)")
        inputs = {"A": A, "absmax": absmax, "code": code}
        if state2 is not None:
            inputs.update({"quant_state.state2.absmax": getattr(state2, "absmax", None),
                           "quant_state.state2.code": getattr(state2, "code", None),
                           "quant_state.offset": offset})  # fmt: skip
        _runtime.check_out(out, {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})
    if state2 is not None:
        check_tensor("quant_state.absmax", absmax, (torch.uint8,), blocks, device)
        _check_state2_fields(state2)
        blocksize2 = _int("quant_state.state2.blocksize", state2.blocksize)  # int() would truncate 64.5
        if blocksize2 not in formats.BLOCKSIZES:
            raise ValueError(f"quant_state.state2.blocksize must be one of {formats.BLOCKSIZES}, got {blocksize2}")
        check_tensor("quant_state.state2.absmax", state2.absmax, (torch.float32,), -(-blocks // blocksize2), device)
        check_tensor("quant_state.state2.code", state2.code, (torch.float32,), 256, device)
        if not isinstance(offset, torch.Tensor) or offset.dtype != torch.float32 or offset.numel() != 1:
            raise TypeError(f"quant_state.offset must be a float32 tensor of one element, got {offset!r}")
        _runtime.check_device("quant_state.offset", offset, device)
        absmax = _dequantize(absmax, state2.absmax, state2.code, blocksize2, torch.float32)
        absmax += offset
    else:
        check_tensor("absmax" if quant_state is None else "quant_state.absmax", absmax, (torch.float32,), blocks,
                     device)  # fmt: skip
    return _dequantize(A, absmax, code, int(blocksize), dtype, out)

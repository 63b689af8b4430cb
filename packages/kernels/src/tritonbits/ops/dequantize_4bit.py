"""NF4/FP4 dequantization of bitsandbytes 4-bit weights in ONE Triton launch, bit-exact with bnb.

    absmax[b] = fl(fl(code2[absmax_u8[b]] * absmax2[b // blocksize2]) + offset)     (nested only)
    w[i]      = to_dtype(fl(code4[nibble(i)] * absmax[i // blocksize]))           round to nearest even

Packed byte j holds element 2j in its HIGH nibble and 2j+1 in its LOW nibble (docs/format.md). The quant
state is validated and cached by `tritonbits.quant_state.prepare`, shared with the other 4-bit ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _runtime, formats
from .._launcher import CachedLauncher
from .._triton_helpers import decode_nibbles, mul_ftz, mul_ftz_add_rn, store_float
from ..quant_state import PreparedWeight, QuantState, check_tensor, prepare, validate

# NOTE: a tile is `tile_for(n_bytes)` packed bytes, laid out as rows of at most MAX_COLS bytes so that every
# row sits inside one quantization block and its absmax is computed once per row, not once per byte.
MAX_COLS = 128


def tile_for(n_bytes: int) -> tuple[int, int]:
    """(packed bytes per program, warps). NOTE: CUDA-graph sweep on H200, nf4 nested bs64 bf16, GB/s:
    4096x1024: 2706 at 1024B/2w vs 2591 at 2048B/4w; 8192x2048: 3755 vs 3636; 14336x4096: 3874 vs 3866;
    28672x8192: 3848 vs 3964, and 4049 at 4096B/4w. Small CTAs balance small grids; big tensors like
    bigger tiles. Every variant keeps 16 packed bytes per thread (one 16-byte load)."""
    if n_bytes <= 32 << 20:
        return 1024, 2
    return 4096, 4


# NOTE: the nested absmax is a product then a sum, each rounded (bnb's two fp32 roundings; mul_ftz_add_rn). By
# default the kernel is compiled with fp fusion off, so the compiler cannot contract them into one FMA; USE_ASM
# instead keeps fusion on and spells the two roundings in PTX (mul.rn / add.rn cannot be contracted).
USE_ASM_DEFAULT = False

# NOTE: eviction hints: the streamed packed bytes and outputs evict_first, the absmax and code tables
# evict_last. Measured against no hints (H200, CUDA-graph medians, % of the expand-only pattern timed in the
# same run; bf16 and fp16, three runs each; docs/gpu-runs/logs/*-tune-dequantize_4bit-*.txt): -0.3 to +1.7
# points on the three large shapes (28672x8192: +0.8 to +1.7, 100.1-100.7% with hints, 98.9-99.3% without),
# +0.2 to +0.6 on 8192x2048, and -1.6 to +1.6 (median -1.0) on 4096x1024, whose 10 MB of traffic stays in
# L2 across graph replays. Kept on: it helps where the stream is larger than L2, which is where weights live.
EVICT = True


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr, absmax_ptr, code_ptr, out_ptr,
    code2_ptr, absmax2_ptr, offset_ptr,
    n_elements, n_bytes,
    BYTES_PER_QBLOCK: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr, MANUAL_BF16: tl.constexpr, USE_ASM: tl.constexpr,
    STREAM: tl.constexpr, TABLE: tl.constexpr, FTZ: tl.constexpr,
):  # fmt: skip
    """One program dequantizes ROWS x COLS packed bytes into 2 x ROWS x COLS outputs.

    Row r of the tile is packed bytes [r*COLS, (r+1)*COLS); COLS divides BYTES_PER_QBLOCK (= blocksize/2),
    so row r uses absmax[r*COLS // BYTES_PER_QBLOCK], computed once. Offsets: an int64 base per program
    (tensors can pass 2**31 elements), int32 within the tile. STREAM and TABLE: the eviction policies of
    the streamed bytes/outputs and of the small tables (absmax, codes); see EVICT.
    """
    BYTES: tl.constexpr = ROWS * COLS
    byte_base = tl.program_id(0).to(tl.int64) * BYTES
    rows = tl.arange(0, ROWS)
    local = rows[:, None] * COLS + tl.arange(0, COLS)[None, :]
    bytes_left = tl.minimum(n_bytes - byte_base, BYTES).to(tl.int32)
    packed = tl.load(packed_ptr + byte_base + local, mask=local < bytes_left, other=0, eviction_policy=STREAM)

    qblock = (byte_base + rows * COLS) // BYTES_PER_QBLOCK
    row_ok = rows * COLS < bytes_left
    if NESTED:
        q = tl.load(absmax_ptr + qblock, mask=row_ok, other=0, eviction_policy=TABLE).to(tl.int32)
        c2 = tl.load(code2_ptr + q, eviction_policy=TABLE)
        a2 = tl.load(absmax2_ptr + qblock // BLOCKSIZE2, mask=row_ok, other=0.0, eviction_policy=TABLE)
        absmax = mul_ftz_add_rn(c2, a2, tl.load(offset_ptr), USE_ASM, FTZ)
    else:
        absmax = tl.load(absmax_ptr + qblock, mask=row_ok, other=0.0, eviction_policy=TABLE)

    hi, lo = decode_nibbles(packed, code_ptr, TABLE)
    # bnb's products are mul.ftz (fast math): below 2**-126 a signed zero
    values = tl.interleave(mul_ftz(hi, absmax[:, None], FTZ), mul_ftz(lo, absmax[:, None], FTZ))  # 2j, then 2j+1

    out_local = rows[:, None] * (2 * COLS) + tl.arange(0, 2 * COLS)[None, :]
    elements_left = tl.minimum(n_elements - 2 * byte_base, 2 * BYTES).to(tl.int32)
    store_float(out_ptr + 2 * byte_base + out_local, values, out_local < elements_left, MANUAL_BF16, STREAM)


def check_out(out, state: QuantState, device: torch.device, inputs: dict | None) -> None:
    """out's type, dtype, shape, layout and device; with `inputs`, no memory overlap with them (a traced
    call passes None: its values have no addresses, the .out op checks overlap when it runs)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    check_tensor("out", out, (state.dtype,), None, device)
    if out.shape != state.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(state.shape)}")
    if inputs is not None:
        _runtime.check_out(out, inputs)


def launch(A, absmax, code2, absmax2, offset, out, blocksize: int, blocksize2: int, quant_type: str,
           *, kernel=None, **overrides) -> None:  # fmt: skip
    """Launch the kernel on validated arguments. `kernel` lets torch.library.wrap_triton wrap it; the
    overrides (see `plan`) replace the defaults for sweeps and tests."""
    if out.numel() == 0:
        return
    grid, args, constexprs, options = plan(A, absmax, code2, absmax2, offset, out, blocksize, blocksize2,
                                           quant_type, **overrides)  # fmt: skip
    if kernel is not None:  # wrap_triton (triton_op) traces the plain launch
        kernel[grid](*args, **constexprs, **options)
    else:
        _launcher(grid, args, constexprs, options, out.device)


OUT_SLOT = 3  # where `out` sits in the kernel's arguments


def plan(A, absmax, code2, absmax2, offset, out, blocksize: int, blocksize2: int, quant_type: str,
         *, use_asm: bool | None = None, manual_bf16: bool | None = None, bytes_per_program: int | None = None,
         num_warps: int | None = None, evict: bool | None = None, maxnreg: int | None = None,
         ) -> tuple[tuple[int, int, int], tuple, dict, dict]:  # fmt: skip
    """(grid, args, constexprs, options) of one launch: tile and warps by size (`tile_for`), eviction hints
    when EVICT."""
    n = out.numel()
    n_bytes = (n + 1) // 2
    device = out.device
    use_asm = USE_ASM_DEFAULT if use_asm is None else use_asm
    if use_asm and _runtime.INTERPRET:
        raise ValueError("use_asm=True needs a GPU: the Triton interpreter cannot run inline PTX")
    if manual_bf16 is None:
        manual_bf16 = out.dtype == torch.bfloat16 and not _runtime.native_bf16_conversion(device)
    if manual_bf16 and out.dtype != torch.bfloat16:
        raise ValueError(f"manual_bf16=True needs a bfloat16 output, got {out.dtype}")
    if bytes_per_program is None or num_warps is None:
        bytes_per_program, num_warps = tile_for(n_bytes)
    cols = min(blocksize // 2, MAX_COLS)
    rows = max(bytes_per_program // cols, 1)
    nested = code2 is not None
    dummy = absmax  # unused pointer arguments when not nested
    evict = EVICT if evict is None else evict
    grid = (triton.cdiv(n_bytes, rows * cols), 1, 1)
    args = (A.view(torch.uint8) if A.dtype != torch.uint8 else A,
            absmax, formats.code_table(quant_type, device), out.view(torch.int16) if manual_bf16 else out,
            code2 if nested else dummy, absmax2 if nested else dummy, offset if nested else dummy,
            n, n_bytes)  # fmt: skip
    constexprs = {"BYTES_PER_QBLOCK": blocksize // 2, "BLOCKSIZE2": blocksize2, "NESTED": nested, "ROWS": rows,
                  "COLS": cols, "MANUAL_BF16": manual_bf16, "USE_ASM": use_asm,
                  "STREAM": "evict_first" if evict else "", "TABLE": "evict_last" if evict else "",
                  "FTZ": _runtime.ftz_mode(device)}  # fmt: skip
    options = {"num_warps": num_warps, **({} if use_asm else {"enable_fp_fusion": False})}
    if maxnreg is not None:  # a register cap (more resident programs per SM), for sweeps
        options["maxnreg"] = maxnreg
    return grid, args, constexprs, options


_launcher = CachedLauncher(_dequantize_4bit_kernel)


def launch_weight(w: PreparedWeight, out: torch.Tensor, **overrides) -> None:
    """`launch` on a prepared weight's fields."""
    s = w.state
    launch(w.A, w.absmax, w.code2, w.absmax2, w.offset, out, s.blocksize, w.blocksize2, s.quant_type, **overrides)


# ---------------------------------------------------------------------------------------------------
# torch.library registration. Eager calls launch directly (below); under torch.compile the public function
# calls a registered op so that fullgraph=True holds: on CUDA the triton_op (Inductor sees the kernel and
# launches it from its own generated code), for CPU tensors (interpreter) and for out= the opaque custom ops.
# NOTE: chosen by the mlp_compile benchmark (H200, records 20261122T013557Z and 20261122T014457Z): in CUDA
# graphs both run at 0.94-0.99x the eager time; with launches included the compiled MLP took 1.42-1.65x the
# eager time with the triton_op and 3.37-3.59x with the custom op (175-280 vs 385-472 us of host time per
# forward, ci/compile_overhead.py): a custom op goes through the dispatcher and its wrappers on every call.


@torch.library.custom_op("tritonbits::dequantize_4bit", mutates_args=())
def _dequantize_4bit_op(
    A: torch.Tensor, absmax: torch.Tensor, code2: torch.Tensor | None, absmax2: torch.Tensor | None,
    offset: torch.Tensor | None, blocksize: int, blocksize2: int, quant_type: str, shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    out = torch.empty(shape, dtype=dtype, device=A.device)
    launch(A, absmax, code2, absmax2, offset, out, blocksize, blocksize2, quant_type)
    return out


@_dequantize_4bit_op.register_fake
def _(A, absmax, code2, absmax2, offset, blocksize, blocksize2, quant_type, shape, dtype):
    return A.new_empty(shape, dtype=dtype)


@torch.library.custom_op("tritonbits::dequantize_4bit.out", mutates_args=("out",))
def _dequantize_4bit_out_op(
    A: torch.Tensor, absmax: torch.Tensor, code2: torch.Tensor | None, absmax2: torch.Tensor | None,
    offset: torch.Tensor | None, blocksize: int, blocksize2: int, quant_type: str, out: torch.Tensor,
) -> None:  # fmt: skip
    _runtime.check_out(out, {"A": A, "absmax": absmax, "code2": code2, "absmax2": absmax2, "offset": offset})
    launch(A, absmax, code2, absmax2, offset, out, blocksize, blocksize2, quant_type)


@_dequantize_4bit_out_op.register_fake
def _(A, absmax, code2, absmax2, offset, blocksize, blocksize2, quant_type, out):
    return None


@torch.library.triton_op("tritonbits::dequantize_4bit_triton_op", mutates_args=())
def _dequantize_4bit_triton_op(
    A: torch.Tensor, absmax: torch.Tensor, code2: torch.Tensor | None, absmax2: torch.Tensor | None,
    offset: torch.Tensor | None, blocksize: int, blocksize2: int, quant_type: str, shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """The same kernel as a triton_op (CUDA only). The PTX path keeps the nested absmax exact, since
    wrap_triton takes no compile options (no enable_fp_fusion=False)."""
    _runtime.outside_fake(formats.code_table, quant_type, A.device)
    out = torch.empty(shape, dtype=dtype, device=A.device)
    launch(A, absmax, code2, absmax2, offset, out, blocksize, blocksize2, quant_type, use_asm=True,
           kernel=torch.library.wrap_triton(_dequantize_4bit_kernel))  # fmt: skip
    return out


def _check_transposable(A: torch.Tensor, state: QuantState) -> None:
    """A [1, n/2] A gets its result transposed back (bnb's shim): a result of more than 2 dims has no .t()."""
    if A.shape[0] == 1 and len(state.shape) > 2:
        raise ValueError(f"A has shape {tuple(A.shape)} (bnb's transposed [1, n/2] layout, whose result is "
                         f"transposed back) but quant_state.shape {tuple(state.shape)} has more than 2 dims: pass A "
                         "as [(n + 1) // 2, 1] or 1-D")  # fmt: skip


def _compiled_call(A: torch.Tensor, quant_state, out: torch.Tensor | None) -> torch.Tensor:
    """Under torch.compile: validate on the traced values (no cache), then call a registered op."""
    state = QuantState.from_any(quant_state)
    device = validate(A, state)
    _check_transposable(A, state)
    w = PreparedWeight.build(A, state)
    fields = (w.A, w.absmax, w.code2, w.absmax2, w.offset, state.blocksize, w.blocksize2, state.quant_type)
    if out is not None:
        check_out(out, state, device, None)
        _dequantize_4bit_out_op(*fields, out)
        return out
    op = _dequantize_4bit_triton_op if A.device.type == "cuda" else _dequantize_4bit_op
    return op(*fields, list(state.shape), state.dtype)


def dequantize_4bit(
    A: torch.Tensor,
    quant_state=None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int | None = None,
    quant_type: str = "fp4",
) -> torch.Tensor:
    """Dequantize a bitsandbytes 4-bit weight: `bitsandbytes.functional.dequantize_4bit`'s signature and
    result, equal bit for bit, in one launch (nested absmax included).

    A: the packed weight (uint8, or the quant_storage dtype bnb used), or a bnb ``Params4bit`` (then
    ``quant_state`` defaults to ``A.quant_state``). quant_state: a bnb QuantState, a tritonbits QuantState or
    any object with its fields. Without a quant_state, as in bnb: ``absmax`` (float32 per block) and ``out``
    give the state (shape and dtype from ``out``; ``blocksize`` defaults to 64, ``quant_type`` to "fp4").
    Returns a tensor of ``quant_state.shape`` and ``quant_state.dtype`` — transposed when ``A.shape[0] == 1``,
    as bnb returns it for the packed ``[1, n/2]`` layout.

    >>> w = tritonbits.dequantize_4bit(layer.weight)                # a bnb Linear4bit's weight
    >>> w = tritonbits.dequantize_4bit(packed, quant_state, out=buf)
    """
    if quant_state is None:
        quant_state = getattr(A, "quant_state", None)
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("quant_state is required, unless A is a bitsandbytes Params4bit that carries one, or "
                             "absmax and out are both given (bnb's form without a quant state)")  # fmt: skip
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        quant_state = QuantState(absmax=absmax, shape=out.shape, dtype=out.dtype,
                                 blocksize=64 if blocksize is None else blocksize, quant_type=quant_type)  # fmt: skip
    if type(A) is not torch.Tensor and isinstance(A, torch.nn.Parameter):
        A = A.data
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if A.dim() == 0:  # bnb reads A.shape[0] (its [1, n/2] transpose shim): a 0-d A has none
        raise ValueError("A is 0-d; pass the packed bytes as bnb stores them, [(n + 1) // 2, 1] (or 1-d)")
    call = _compiled_call if torch.compiler.is_compiling() else _eager
    result = call(A, quant_state, out)
    return result.t() if A.shape[0] == 1 else result


# NOTE: eager calls launch directly (the custom-op dispatcher adds host time on every call), and a quant_state
# seen before with the same tensors is neither re-validated nor re-planned (quant_state.prepare): its launch is
# bound once (the kernel's launcher with every argument but `out` fixed). Users dequantize the same layers
# every step, and host time is the whole cost of a small layer's dequant + sync.
def _eager(A: torch.Tensor, quant_state, out: torch.Tensor | None) -> torch.Tensor:
    w = prepare(A, quant_state)
    state = w.state
    _check_transposable(A, state)
    if out is not None:
        inputs = {"A": A, "quant_state.absmax": w.absmax, "quant_state.state2.absmax": w.absmax2,
                  "quant_state.state2.code": w.code2, "quant_state.offset": w.offset}  # fmt: skip
        check_out(out, state, A.device, inputs)
        launch_weight(w, out)
        return out
    # the sizes as ints: torch's argument parser takes 0.75 us for them against 1.45 us for a torch.Size (CPU
    # timeit; dequant_bias's eager NOTE)
    out = torch.empty(*state.shape, dtype=state.dtype, device=A.device)
    bound = w.launches.get("dequantize_4bit")
    if bound is not None and bound(out):
        return out
    if out.numel():
        launch_ = plan(w.A, w.absmax, w.code2, w.absmax2, w.offset, out, state.blocksize, w.blocksize2,
                       state.quant_type)  # fmt: skip
        _launcher(*launch_, out.device)
        bound = _launcher.bind(*launch_, out.device, slots=(OUT_SLOT,))  # fresh torch.empty: 16-byte aligned
        if bound is not None:
            w.launches["dequantize_4bit"] = bound
    return out

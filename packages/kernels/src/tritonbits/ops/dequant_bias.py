"""The dequant+bias epilogue of INT8/FP8 GEMMs, fused: out = acc * scale_a * scale_b + bias.

    out[m, n] = to_out(fl32(acc[m, n] * scale_a[m] * scale_b[n] + bias[n]))

fp32 math, one rounding at the store. scale_a per token ([M,1] | [M] | scalar), scale_b per channel
([1,N] | [N] | scalar), bias [N] | [1,N] | None. Tile configs come from a checked-in table per GPU family
(configs/dequant_bias.json, written by `nox -s tune-<gpu>`), never from tuning at call time.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _runtime, configs
from .._launcher import CachedLauncher
from .._triton_helpers import round_to_bf16_bits

ACC_DTYPES = (torch.int32, torch.bfloat16, torch.float16, torch.float32)
SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _dequant_bias_kernel(
    acc_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr,
    M, N, stride_am, stride_om, stride_sa, stride_sb, stride_bias,
    HAS_BIAS: tl.constexpr, MANUAL_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program writes a BLOCK_M x BLOCK_N tile. Scalar scales arrive with stride 0, so one code path
    serves [M], [M,1] and 0-d alike. Row offsets are int64 (M * stride can pass 2**31)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)

    acc = tl.load(acc_ptr + rows64[:, None] * stride_am + cols[None, :], mask=mask, other=0,
                  eviction_policy="evict_first").to(tl.float32)  # fmt: skip
    sa = tl.load(sa_ptr + rows * stride_sa, mask=row_ok, other=0.0).to(tl.float32)
    sb = tl.load(sb_ptr + cols * stride_sb, mask=col_ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
    out = acc * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_bias, mask=col_ok, other=0.0, eviction_policy="evict_last")
        out = out + bias.to(tl.float32)[None, :]
    out = round_to_bf16_bits(out) if MANUAL_BF16 else out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows64[:, None] * stride_om + cols[None, :], out, mask=mask)


# ---------------------------------------------------------------------------------------------------
# Configs: (BLOCK_M, BLOCK_N, num_warps) per GPU family, acc dtype, M bucket and N bucket (powers of 2).


def bucket(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


M_BUCKET_MAX, N_BUCKET_MAX = 65536, 16384


def config_key(acc_dtype: torch.dtype, m: int, n: int) -> str:
    """The table key of a problem: acc dtype and power-of-two buckets of M and N (the tuner writes with it)."""
    return f"{configs.dtype_key(acc_dtype)}/{min(bucket(m), M_BUCKET_MAX)}x{min(bucket(n), N_BUCKET_MAX)}"


def heuristic_config(m: int, n: int) -> tuple[int, int, int]:
    """For GPUs with no tuned table: ~8K-element tiles, wide along N for coalesced 16-byte accesses."""
    block_n = min(256, max(16, bucket(n)))
    block_m = min(max(8192 // block_n, 1), max(bucket(m), 1))
    warps = 8 if block_m * block_n >= 8192 else 4
    return block_m, block_n, warps


@functools.lru_cache(maxsize=4096)  # keyed by bucket, not exact M: bounded by families x dtypes x buckets
def _config(device: torch.device, key: str) -> tuple[int, int, int] | None:
    cfg = configs.lookup("dequant_bias", device, key)
    return tuple(cfg) if cfg else None


def config_for(device: torch.device, acc_dtype: torch.dtype, m: int, n: int) -> tuple[int, int, int]:
    """The tuned (BLOCK_M, BLOCK_N, num_warps) of this problem's bucket, else `heuristic_config`."""
    return _config(device, config_key(acc_dtype, m, n)) or heuristic_config(m, n)


# ---------------------------------------------------------------------------------------------------


def _vector(name: str, t, length: int, axis: str, device, *, scalar: bool = True) -> int:
    """Validate a per-row/per-column (or, where `scalar`, a one-element) operand; return its element stride
    (0 for a scalar)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SCALE_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    _runtime.check_device(name, t, device)
    if scalar and t.numel() == 1 and t.dim() <= 2:
        return 0
    shapes = {"M": ((length,), (length, 1)), "N": ((length,), (1, length))}[axis]
    if tuple(t.shape) not in shapes:
        allowed = " or ".join(str(list(s)) for s in shapes) + (" or a scalar" if scalar else "")
        raise ValueError(f"{name} has shape {list(t.shape)}; expected {allowed} ({axis}={length})")
    return t.stride(0) if t.dim() == 1 or axis == "M" else t.stride(1)


def validate(acc, scale_a, scale_b, bias, out_dtype, out):
    if not isinstance(acc, torch.Tensor):
        raise TypeError(f"acc must be a torch.Tensor, got {type(acc).__name__}")
    if acc.dtype not in ACC_DTYPES:
        raise TypeError(f"acc must be int32, bfloat16, float16 or float32, got {acc.dtype}")
    if acc.dim() != 2:
        raise ValueError(f"acc must be 2-D [M, N], got shape {list(acc.shape)}")
    device = _runtime.check_device("acc", acc)
    m, n = acc.shape
    if n > 1 and acc.stride(1) != 1:
        raise ValueError(f"acc must be row-major (unit stride along N); got strides {acc.stride()}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    sa_stride = _vector("scale_a", scale_a, m, "M", device)
    sb_stride = _vector("scale_b", scale_b, n, "N", device)
    bias_stride = 0
    if bias is not None:
        bias_stride = _vector("bias", bias, n, "N", device, scalar=False)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        _runtime.check_device("out", out, device)
        if out.dtype != out_dtype:
            raise TypeError(f"out has dtype {out.dtype}, but out_dtype is {out_dtype}")
        if tuple(out.shape) != (m, n):
            raise ValueError(f"out has shape {list(out.shape)}, expected {[m, n]}")
        if n > 1 and out.stride(1) != 1:
            raise ValueError(f"out must be row-major (unit stride along N); got strides {out.stride()}")
        if m > 1 and out.stride(0) < n:
            raise ValueError(f"out rows overlap (strides {out.stride()}, N={n}): an expanded out cannot be written")
        _runtime.check_out(out, {"acc": acc, "scale_a": scale_a, "scale_b": scale_b, "bias": bias}, may_alias="acc")
    return sa_stride, sb_stride, bias_stride


def launch(acc, scale_a, scale_b, bias, out, sa_stride, sb_stride, bias_stride, *, config=None, kernel=None):
    m, n = acc.shape
    if m == 0 or n == 0:
        return
    block_m, block_n, warps = config or config_for(acc.device, acc.dtype, m, n)
    manual_bf16 = out.dtype == torch.bfloat16 and not _runtime.native_bf16_conversion(acc.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), 1)
    args = (acc, scale_a, scale_b, bias if bias is not None else scale_b,
            out.view(torch.int16) if manual_bf16 else out,
            m, n, acc.stride(0), out.stride(0), sa_stride, sb_stride, bias_stride)  # fmt: skip
    constexprs = {"HAS_BIAS": bias is not None, "MANUAL_BF16": manual_bf16, "BLOCK_M": block_m, "BLOCK_N": block_n}
    if kernel is not None:
        kernel[grid](*args, **constexprs, num_warps=warps)
    else:
        _launcher(grid, args, constexprs, {"num_warps": warps}, acc.device)


_launcher = CachedLauncher(_dequant_bias_kernel)


@torch.library.custom_op("tritonbits::dequant_bias", mutates_args=())
def _dequant_bias_op(acc: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, bias: torch.Tensor | None,
                     out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    strides = validate(acc, scale_a, scale_b, bias, out_dtype, None)
    out = torch.empty(acc.shape, dtype=out_dtype, device=acc.device)
    launch(acc, scale_a, scale_b, bias, out, *strides)
    return out


@_dequant_bias_op.register_fake
def _(acc, scale_a, scale_b, bias, out_dtype):
    return acc.new_empty(acc.shape, dtype=out_dtype)


@torch.library.custom_op("tritonbits::dequant_bias.out", mutates_args=("out",))
def _dequant_bias_out_op(acc: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                         bias: torch.Tensor | None, out: torch.Tensor) -> None:  # fmt: skip
    strides = validate(acc, scale_a, scale_b, bias, out.dtype, out)
    launch(acc, scale_a, scale_b, bias, out, *strides)


@_dequant_bias_out_op.register_fake
def _(acc, scale_a, scale_b, bias, out):
    return None


def dequant_bias(
    acc: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = acc * scale_a * scale_b + bias, fused, fp32 math, one rounding to ``out_dtype``.

    acc: [M, N] int32 (``torch._int_mm``), bf16, fp16 or fp32, row-major with any row stride.
    scale_a: per token [M, 1] | [M] | scalar; scale_b: per channel [1, N] | [N] | scalar (fp32; fp16/bf16
    are upcast). bias: [N] | [1, N] or None. out_dtype: bfloat16 by default, or out.dtype when out is given
    (both given and different is an error). out may be acc itself (in place, same dtype), never a partial
    overlap with an input. Not differentiable: an input that requires grad (with grad enabled) is refused.

    >>> acc = torch._int_mm(x_int8, w_int8.t())
    >>> y = tritonbits.dequant_bias(acc, x_scale, w_scale, bias, out_dtype=torch.bfloat16)
    """
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out_dtype is not None and out_dtype != out.dtype:
            raise TypeError(f"out has dtype {out.dtype}, but out_dtype is {out_dtype}")
        out_dtype = out.dtype
    elif out_dtype is None:
        out_dtype = torch.bfloat16
    if torch.is_grad_enabled():
        for name, t in (("acc", acc), ("scale_a", scale_a), ("scale_b", scale_b), ("bias", bias)):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise ValueError(f"dequant_bias is not differentiable, but {name} requires grad: detach it or "
                                 "call under torch.no_grad()")  # fmt: skip
    if torch.compiler.is_compiling():
        if out is not None:
            _dequant_bias_out_op(acc, scale_a, scale_b, bias, out)
            return out
        return _dequant_bias_op(acc, scale_a, scale_b, bias, out_dtype)
    # NOTE: eager calls launch directly: the custom-op dispatcher adds host time on every call.
    strides = validate(acc, scale_a, scale_b, bias, out_dtype, out)
    if out is None:
        out = torch.empty(acc.shape, dtype=out_dtype, device=acc.device)
    launch(acc, scale_a, scale_b, bias, out, *strides)
    return out

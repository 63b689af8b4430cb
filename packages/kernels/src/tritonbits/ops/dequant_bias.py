"""The dequant+bias epilogue of INT8/FP8 GEMMs, fused: out = acc * scale_a * scale_b + bias.

    out[m, n] = to_out(fl32(acc[m, n] * scale_a[m] * scale_b[n] + bias[n]))

fp32 math, one rounding at the store. scale_a per token ([M,1] | [M] | scalar), scale_b per channel
([1,N] | [N] | scalar), bias [N] | [1,N] | None. Two kernel paths, chosen on the host (`plan`):

- "1d": acc and out contiguous ([M, N] is one flat stream of M*N elements): each program handles BLOCK
  consecutive elements; row and column by division by N as a compile-time constant (one compile per N), the
  per-row and per-column operands gathered per element, as Inductor's own pointwise kernel does.
- "2d": one program per BLOCK_M x BLOCK_N tile; any row stride (a slice of a larger buffer).

A config names its path: ("1d", BLOCK, num_warps) or ("2d", BLOCK_M, BLOCK_N, num_warps). Configs come from a
checked-in table per GPU family (configs/dequant_bias.json, written by `nox -s tune-<gpu>`), else from
`heuristic_config`, never from tuning at call time.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import _runtime, configs
from .._launcher import BoundLaunch, CachedLauncher
from .._triton_helpers import round_to_bf16_bits, store_float

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
    """The "2d" path: one program writes a BLOCK_M x BLOCK_N tile. Scalar scales arrive with stride 0, so
    one code path serves [M], [M,1] and 0-d alike. Row offsets are int64 (M * stride can pass 2**31)."""
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


@triton.jit
def _dequant_bias_1d_kernel(
    acc_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr,
    TOTAL, stride_sa, stride_sb, stride_bias,
    N: tl.constexpr, HAS_BIAS: tl.constexpr, MANUAL_BF16: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr,
    INT64: tl.constexpr,
):  # fmt: skip
    """The "1d" path: acc and out are contiguous [M, N], one flat stream of TOTAL = M*N elements; program p
    handles [p*BLOCK, (p+1)*BLOCK). Row and column of each element by division by N, a compile-time constant
    (a multiply and shift, not a division: one compiled kernel per distinct N), then per-element gathers of
    scale_a[row], scale_b[col] and bias[col] (L1/L2 hits: within a program they repeat or run contiguously).
    Scalar scales arrive with stride 0. EVEN: TOTAL is a multiple of BLOCK (no mask on the stream). INT64: the
    indices in int64, only where the grid's elements pass 2**31 - 1 (`index_int64`), else int32 as Inductor's
    pointwise kernels index. NOTE: int64 index math costs 13.25 against 11.25 SASS instructions a value for bf16
    acc and 16.0-16.5 against 14.75 for int32 acc (offline compile, triton 3.6, sm90; ci/sass_count.py's compile).
    Timed side by side on the H100 at the L2-resident sizes where the full grid lost to torch.compile
    (ci/dequant_bias_index_probe.py, log docs/gpu-runs/logs/20261124T0315Z-nvidia-h100-dequant_bias-index-probe.txt):
    within +-1% at most points, 2-4% faster at three (bf16 512 x 14336 6.76 -> 6.60 us, int32 128 x 28672
    4.80 -> 4.59, int32 2048 x 2560 6.14 -> 6.07): most of those losses were the table's tiles, not the indices.
    """
    if INT64:
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = tl.full([BLOCK], True, tl.int1) if EVEN else idx < TOTAL
    row = idx // N
    col = idx % N
    acc = tl.load(acc_ptr + idx, mask=mask, other=0).to(tl.float32)
    sa = tl.load(sa_ptr + row * stride_sa, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
    sb = tl.load(sb_ptr + col * stride_sb, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
    out = acc * sa * sb
    if HAS_BIAS:
        bias = tl.load(bias_ptr + col * stride_bias, mask=mask, other=0.0, eviction_policy="evict_last")
        out = out + bias.to(tl.float32)
    store_float(out_ptr + idx, out, mask, MANUAL_BF16, "")


# ---------------------------------------------------------------------------------------------------
# Configs: ("1d", BLOCK, num_warps) or ("2d", BLOCK_M, BLOCK_N, num_warps) per GPU family, acc dtype,
# M bucket (a power of 2) and N bucket (a quarter octave, `n_bucket`).

Config = tuple  # ("1d", BLOCK, num_warps) | ("2d", BLOCK_M, BLOCK_N, num_warps)
INT32_MAX = 2**31 - 1


def index_int64(total: int, block: int, *gather_offsets: int) -> bool:
    """Whether the flat kernel's index math needs int64: its last program's indices reach the grid's
    cdiv(total, block) * block - 1 (masked beyond total), and the scale/bias gathers reach `gather_offsets`
    ((M-1) * scale_a's stride, (N-1) * scale_b's and bias's: a [M, 1] view can have any row stride); int32
    holds up to INT32_MAX."""
    return max((triton.cdiv(total, block) * block - 1, *gather_offsets)) > INT32_MAX


def bucket(x: int) -> int:
    """x rounded up to a power of two (M's bucket)."""
    return 1 << max(x - 1, 0).bit_length()


def n_bucket(n: int) -> int:
    """n rounded up to a quarter octave: the next of 4, 5, 6, 7 or 8 times 2**(k-2), 2**k <= n < 2**(k+1).
    NOTE: N buckets were powers of two until session 14: 11008, 13824 and 14336 shared 16384's entry, and the
    H100 tile tuned on 13824 took 9.4 us at fp32/int32 512 x 11008, where the flat kernel takes 7.2-7.4 us
    (0.76-0.78x torch.compile; log docs/gpu-runs/logs/20261124T0315Z-nvidia-h100-dequant_bias-index-probe.txt).
    Quarter octaves give the grid's N (2560, 3840/4096, 13824/14336, 1000, 6144, 11008, 28672) seven keys."""
    step = 1 << max(n.bit_length() - 3, 0)
    return -(-n // step) * step


# NOTE: the tables name the N buckets of the benchmark grid (1024, 2560, 4096, 6144, 12288, 14336, 28672); any
# other N (8192, 16384, 32000, ...) takes `heuristic_config`, not its nearest tuned N: scored leave-one-out on
# session 14's tune dumps (ci/dequant_bias_heuristic_fit.py --nearest), the nearest other tuned N's best config
# is over 1.05x the best at 35 + 26 of the 144 + 144 keys with the N (H100 + H200, worst 1.60x), the
# heuristic at 13 + 7. The caps bound the keys; N > 28672 rounds to 32768 and beyond, untuned.
M_BUCKET_MAX, N_BUCKET_MAX = 65536, 32768


def config_key(acc_dtype: torch.dtype, m: int, n: int) -> str:
    """The table key of a problem: acc dtype, M's power-of-two bucket and N's quarter-octave bucket
    (`n_bucket`); the tuner writes with this function, so every tuned entry is reachable."""
    return f"{configs.dtype_key(acc_dtype)}/{min(bucket(m), M_BUCKET_MAX)}x{min(n_bucket(n), N_BUCKET_MAX)}"


def as_config(cfg) -> Config:
    """A table entry as a launch config: ["1d", BLOCK, warps], ["2d", BM, BN, warps], or a legacy
    [BM, BN, warps] triple (a "2d" tile, as the tables before the 1-D path wrote them)."""
    cfg = tuple(cfg)
    if len(cfg) == 3 and all(isinstance(v, int) for v in cfg):
        cfg = ("2d", *cfg)
    kind, *sizes = cfg
    if not ((kind == "1d" and len(sizes) == 2) or (kind == "2d" and len(sizes) == 3)):
        raise ValueError(f"bad dequant_bias config {cfg!r}: expected ('1d', BLOCK, warps) or "
                         "('2d', BLOCK_M, BLOCK_N, warps)")  # fmt: skip
    if not all(isinstance(v, int) and v > 0 and v & (v - 1) == 0 for v in sizes):
        raise ValueError(f"bad dequant_bias config {cfg!r}: sizes and warps must be powers of two")
    return (kind, *sizes)


def heuristic_2d(m: int, n: int) -> Config:
    """~8K-element tiles, wide along N for coalesced 16-byte accesses."""
    block_n = min(256, max(16, bucket(n)))
    block_m = min(max(8192 // block_n, 1), max(bucket(m), 1))
    warps = 8 if block_m * block_n >= 8192 else 4
    return ("2d", block_m, block_n, warps)


# NOTE: the flat heuristic's thresholds (elements, M*N) and configs were fitted to every candidate's timing of
# session 14's tune sweeps on both GPUs (H100 and H200, 252 keys each, bf16 out; ci/dequant_bias_heuristic_fit.py
# over docs/gpu-runs/logs/20261124T04*-tune-dequant_bias-dump.json): over 1.05x the tuned best at 13 + 7 of the
# 144 + 144 keys with the N (1000, 6144, 11008, 28672), worst 1.19x (every N: 22 + 14 of 252 + 252,
# worst 1.21x), against 36 + 45 (worst 1.91x, 1.24x) for session 13's one flat config per acc width (1024 x 8
# warps for 4-byte acc, 2048 x 8 for 2-byte). Scored on the data it was fitted to; timed again in a separate
# run (tune --compare-heuristic): over 1.05x at 9 + 11 of 144 + 144, three of the H100's nine the best config
# itself timed twice (logs 20261124T0433Z / 0420Z-...-bench-dequant_bias-and-compare.txt). The thresholds
# count elements, not bytes: with bf16 out, 8M-16M elements (the 2-D band) is 32-96 MB of acc + out, where the
# stream passes the 50 MB L2 of both GPUs; a GPU with another L2 size, or fp32 out, moves it (not measured).
HEURISTIC_SMALL = 1 << 17  # up to here: 512-element programs of 4 warps (more programs for tiny problems)
HEURISTIC_BAND = (1 << 23, 1 << 24)  # (lo, hi]: the 2-D tile, for N a multiple of 16 (16-byte aligned rows)
HEURISTIC_WIDE = (64, 128, 16384)  # M in [64, 128] and N >= 16384: the 2-D tile (16, 128, 8)


def heuristic_flat(m: int, n: int) -> Config:
    """For contiguous acc and out (the tuner's inputs): the flat kernel with 512, 1024 or 2048-element programs
    by problem size, the 2-D tile in the L2-sized band and for a few wide rows (see the NOTE above)."""
    total, aligned = m * n, n % 16 == 0
    if total <= HEURISTIC_SMALL:
        return ("1d", 512, 4)
    if aligned and HEURISTIC_WIDE[0] <= m <= HEURISTIC_WIDE[1] and n >= HEURISTIC_WIDE[2]:
        return ("2d", 16, 128, 8)
    if aligned and HEURISTIC_BAND[0] < total <= HEURISTIC_BAND[1] and m >= 4:
        return ("2d", 8, 256, 4)
    return ("1d", 1024, 8) if total <= HEURISTIC_BAND[1] else ("1d", 2048, 8)


def heuristic_config(m: int, n: int, flat: bool = True) -> Config:
    """For GPU families and buckets the table does not name: `heuristic_flat` for contiguous inputs (`flat`),
    else the 2-D tile of `heuristic_2d`."""
    return heuristic_flat(m, n) if flat else heuristic_2d(m, n)


@functools.lru_cache(maxsize=4096)  # keyed by bucket, not exact M: bounded by families x dtypes x buckets
def _config(device: torch.device, key: str) -> Config | None:
    cfg = configs.lookup("dequant_bias", device, key)
    return as_config(cfg) if cfg else None


def config_for(device: torch.device, acc_dtype: torch.dtype, m: int, n: int, flat: bool = True) -> Config:
    """The tuned config of this problem's bucket, else `heuristic_config`. A tuned "1d" config on inputs that
    are not `flat` (a row stride != N) gives way to the 2-D heuristic tile."""
    cfg = _config(device, config_key(acc_dtype, m, n))
    if cfg is None or (cfg[0] == "1d" and not flat):
        return heuristic_config(m, n, flat)
    return cfg


def is_flat(acc: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether acc and out are each one contiguous [M, N] stream (the "1d" path's condition)."""
    m, n = acc.shape
    if m <= 1:
        return n <= 1 or (acc.stride(1) == 1 and out.stride(1) == 1)
    return acc.stride(0) == n and out.stride(0) == n and (n == 1 or (acc.stride(1) == 1 and out.stride(1) == 1))


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


def validate(acc, scale_a, scale_b, bias, out_dtype, out, *, check_overlap: bool = True):
    """Check every argument; return (scale_a, scale_b, bias) element strides. `check_overlap=False` skips the
    memory-overlap check of `out` (traced values have no addresses; the .out op checks it when it runs)."""
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
        if check_overlap:
            inputs = {"acc": acc, "scale_a": scale_a, "scale_b": scale_b, "bias": bias}
            _runtime.check_out(out, inputs, may_alias="acc")
    return sa_stride, sb_stride, bias_stride


class Plan(NamedTuple):
    """One launch: which kernel, its grid, runtime arguments, constexprs and options, and the config."""

    kernel: object
    launcher: CachedLauncher
    grid: tuple[int, int, int]
    args: tuple
    constexprs: dict
    options: dict
    config: Config


def plan(acc, scale_a, scale_b, bias, out, sa_stride, sb_stride, bias_stride, *, config=None) -> Plan:
    """The launch of validated arguments: `config` (forced, for sweeps and tests) or `config_for` the problem.
    A forced "1d" config on inputs that are not flat is refused (the kernel would read the wrong rows)."""
    m, n = acc.shape
    flat = is_flat(acc, out)
    if config is None:
        cfg = config_for(acc.device, acc.dtype, m, n, flat)
    else:
        cfg = as_config(config)
        if cfg[0] == "1d" and not flat:
            raise ValueError(f"config {cfg} needs contiguous acc and out (row stride == N); got acc strides "
                             f"{acc.stride()}, out strides {out.stride()}")  # fmt: skip
    manual_bf16 = out.dtype == torch.bfloat16 and not _runtime.native_bf16_conversion(acc.device)
    out_arg = out.view(torch.int16) if manual_bf16 else out
    bias_arg = bias if bias is not None else scale_b  # an unused pointer when there is no bias
    if cfg[0] == "1d":
        _, block, warps = cfg
        grid = (triton.cdiv(m * n, block), 1, 1)
        args: tuple = (acc, scale_a, scale_b, bias_arg, out_arg, m * n, sa_stride, sb_stride, bias_stride)
        wide = index_int64(m * n, block, (m - 1) * sa_stride, (n - 1) * max(sb_stride, bias_stride))
        constexprs = {"N": n, "HAS_BIAS": bias is not None, "MANUAL_BF16": manual_bf16, "BLOCK": block,
                      "EVEN": (m * n) % block == 0, "INT64": wide}  # fmt: skip
        return Plan(_dequant_bias_1d_kernel, _launcher_1d, grid, args, constexprs, {"num_warps": warps}, cfg)
    _, block_m, block_n, warps = cfg
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), 1)
    args = (acc, scale_a, scale_b, bias_arg, out_arg,
            m, n, acc.stride(0), out.stride(0), sa_stride, sb_stride, bias_stride)  # fmt: skip
    constexprs = {"HAS_BIAS": bias is not None, "MANUAL_BF16": manual_bf16, "BLOCK_M": block_m, "BLOCK_N": block_n}
    return Plan(_dequant_bias_kernel, _launcher, grid, args, constexprs, {"num_warps": warps}, cfg)


def launch(acc, scale_a, scale_b, bias, out, sa_stride, sb_stride, bias_stride, *, config=None, kernel=None):
    """Launch on validated arguments (`plan`); `kernel` wraps the chosen jitted kernel (torch.library.
    wrap_triton) for the triton_op, else the op's CachedLauncher launches it."""
    m, n = acc.shape
    if m == 0 or n == 0:
        return
    p = plan(acc, scale_a, scale_b, bias, out, sa_stride, sb_stride, bias_stride, config=config)
    if kernel is not None:
        kernel(p.kernel)[p.grid](*p.args, **p.constexprs, **p.options)
    else:
        p.launcher(p.grid, p.args, p.constexprs, p.options, acc.device)


_launcher = CachedLauncher(_dequant_bias_kernel)
_launcher_1d = CachedLauncher(_dequant_bias_1d_kernel)

# ---------------------------------------------------------------------------------------------------
# Eager plans. A call whose layout was validated and launched before skips `validate` and `plan`: its key is
# everything they read that is not an address (the exact type, dtype, shape, strides and device of every
# tensor, out's requires_grad, out_dtype), the 16-byte alignment of every address (what the compiled kernel is
# specialized on) and bias/out given or not; the value holds the launch bound to the kernel (BoundLaunch, the
# five tensors its slots) and, for out=, what the overlap check needs besides addresses (O(1): five data_ptr
# reads and comparisons). A key is made only for plain tensors (torch.Tensor, nn.Parameter; anything else, a
# subclass included, always takes the slow path); an argument the key cannot be read from, a key never seen, an
# out= that overlaps an input other than by being exactly acc, or a launch hook (the BoundLaunch steps aside)
# also go through `validate`, which refuses with its own message. Plans are made only where the launch can be
# bound (a GPU, or the CPU with tritonbits_harness.launch_stub): the interpreter validates every call.
# NOTE: Python host cost per call on the CPU with the raw launch stubbed (ci/dequant_bias_host_probe.py --compare,
# mins over 30 rounds, a shared 2-core CPU), the previous eager path (validate, then a plan lookup) -> this:
# M=16 N=4096 9.5 -> 4.4 us, M=128 +bias 11.0 -> 4.8 us, M=128 +bias out= 17.3 -> 4.4 us (its span-summing
# overlap check gone), out=acc 18.3 -> 4.4 us; 1.8-1.9x the floor (the plan's BoundLaunch + torch.empty),
# 2.0-2.2x an empty kernel's CachedLauncher call (same run). Allocating with the sizes as ints (torch.empty(m, n))
# then took M=16 4.27 -> 3.94 us, M=128 +bias 4.64 -> 4.32 us (mins over 45 rounds). Left per call (CPU timeit,
# M=16): the key ~1.0 us (its 12 attribute reads 0.67, the 3 data_ptr reads 0.19, the type checks 0.05), its dict
# lookup ~0.27 us (hash and compare of the 13-item key), the BoundLaunch ~1.1 us, torch.empty ~0.8 us on the CPU
# (2.5 us measured on the H100 host, log 20261123T1856Z), the grad and compile checks ~0.25 us.

PLAN_CACHE_MAX = 256
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # types whose attributes are the tensor's own (no torch_function)


class EagerPlan(NamedTuple):
    """A validated layout's launch: the bound kernel, the output's shape and device (out=None), and for out=
    the byte extents of acc, scale_a, scale_b, bias (0 without) and out, and whether out may be exactly acc
    (acc and out have one dtype, shape and strides)."""

    bound: BoundLaunch
    shape: tuple[int, int]
    device: torch.device
    extents: tuple[int, int, int, int, int]  # out= only (zeros where the call allocates out)
    alias_ok: bool


_plans: dict[tuple, EagerPlan] = {}


def _extent(t: torch.Tensor | None) -> int:
    span = _runtime._span(t) if t is not None else None
    return 0 if span is None else span[1] - span[0]


def _plan_key(acc, scale_a, scale_b, bias, out_dtype, out) -> tuple | None:
    """The cache key of a call (see above), or None where an argument is not a plain tensor (or out_dtype not a
    dtype: a list would not hash)."""
    if type(out_dtype) is not torch.dtype or type(acc) not in _PLAIN or type(scale_a) not in _PLAIN:
        return None
    if type(scale_b) not in _PLAIN or not (bias is None or type(bias) in _PLAIN):
        return None
    if not (out is None or type(out) in _PLAIN):
        return None
    try:
        key = (out_dtype, acc.dtype, acc.shape, acc.stride(), acc.device,
               scale_a.dtype, scale_a.shape, scale_a.stride(), scale_a.device,
               scale_b.dtype, scale_b.shape, scale_b.stride(), scale_b.device,
               None if bias is None else (bias.dtype, bias.shape, bias.stride(), bias.device),
               None if out is None else
               (out.dtype, out.shape, out.stride(), out.device, out.requires_grad))  # fmt: skip
        # a fresh out (torch.empty) is 16-byte aligned: CUDA's caching allocator aligns to 512 bytes
        addresses = (acc.data_ptr() | scale_a.data_ptr() | scale_b.data_ptr()
                     | (0 if bias is None else bias.data_ptr()) | (0 if out is None else out.data_ptr()))  # fmt: skip
        if addresses % 16 == 0:
            return key
        # some address is not 16-byte aligned: which ones is part of the kernel's specialization
        return (*key, *(t is None or t.data_ptr() % 16 == 0 for t in (acc, scale_a, scale_b, bias, out)))
    except (AttributeError, RuntimeError):  # e.g. a sparse tensor has no strides: validate says what is wrong
        return None


def _overlaps(p: EagerPlan, acc, scale_a, scale_b, bias, out) -> bool:
    """Whether out's bytes meet any input's, other than out being exactly acc (what `_runtime.check_out`
    allows): the cached extents and this call's addresses (unrolled: this runs on every planned out= call)."""
    e_acc, e_sa, e_sb, e_bias, e_out = p.extents
    lo = out.data_ptr()
    hi = lo + e_out
    start = acc.data_ptr()
    if start < hi and lo < start + e_acc and not (start == lo and p.alias_ok):
        return True
    start = scale_a.data_ptr()
    if start < hi and lo < start + e_sa:
        return True
    start = scale_b.data_ptr()
    if start < hi and lo < start + e_sb:
        return True
    return bias is not None and (start := bias.data_ptr()) < hi and lo < start + e_bias


def _eager(acc, scale_a, scale_b, bias, out_dtype, out) -> torch.Tensor:
    key = _plan_key(acc, scale_a, scale_b, bias, out_dtype, out)
    p = _plans.get(key) if key is not None else None
    if p is not None:
        bias_arg = scale_b if bias is None else bias
        if out is None:
            # NOTE: the sizes as separate ints: torch.empty(16, 4096, ...) parses in 0.77 us against 1.07 us for
            # torch.empty((16, 4096), ...) (CPU timeit, torch 2.15; measured on the CPU only)
            fresh = torch.empty(*p.shape, dtype=out_dtype, device=p.device)
            if p.bound(acc, scale_a, scale_b, bias_arg, fresh):
                return fresh
        elif not _overlaps(p, acc, scale_a, scale_b, bias, out) and p.bound(acc, scale_a, scale_b, bias_arg, out):
            return out
    strides = validate(acc, scale_a, scale_b, bias, out_dtype, out)
    m, n = acc.shape
    given = out
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=acc.device)
    if m == 0 or n == 0:
        return out
    launch_ = plan(acc, scale_a, scale_b, bias, out, *strides)
    launch_.launcher(launch_.grid, launch_.args, launch_.constexprs, launch_.options, acc.device)
    if key is None:
        return out
    bound = launch_.launcher.bind(launch_.grid, launch_.args, launch_.constexprs, launch_.options, acc.device,
                                  slots=(0, 1, 2, 3, 4))  # fmt: skip
    if bound is not None:
        extents = (0, 0, 0, 0, 0)
        if given is not None:
            extents = (_extent(acc), _extent(scale_a), _extent(scale_b), _extent(bias), _extent(given))
        alias_ok = given is not None and (acc.dtype, acc.shape, acc.stride()) == (out.dtype, out.shape, out.stride())
        # (a plan re-bound under a launch hook keeps its key: put_bounded evicts nothing then)
        _runtime.put_bounded(_plans, key, EagerPlan(bound, (m, n), acc.device, extents, alias_ok), PLAN_CACHE_MAX)
    return out


# ---------------------------------------------------------------------------------------------------
# torch.library registration. Eager calls launch directly (above); under torch.compile the public function
# calls a registered op so that fullgraph=True holds: on CUDA the triton_op (Inductor sees the kernel and
# launches it from its own generated code, as dequantize_4bit does), for CPU tensors (interpreter) and for
# out= the opaque custom ops.


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


@torch.library.triton_op("tritonbits::dequant_bias_triton_op", mutates_args=())
def _dequant_bias_triton_op(acc: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                            bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """The same kernels as a triton_op (CUDA only): the path and config are chosen when it is traced."""
    strides = validate(acc, scale_a, scale_b, bias, out_dtype, None)
    out = torch.empty(acc.shape, dtype=out_dtype, device=acc.device)
    launch(acc, scale_a, scale_b, bias, out, *strides, kernel=torch.library.wrap_triton)
    return out


def _compiled_call(acc, scale_a, scale_b, bias, out_dtype, out) -> torch.Tensor:
    """Under torch.compile: validate on the traced values (overlap is checked by the .out op when it runs),
    then call a registered op."""
    validate(acc, scale_a, scale_b, bias, out_dtype, out, check_overlap=False)
    if out is not None:
        _dequant_bias_out_op(acc, scale_a, scale_b, bias, out)
        return out
    op = _dequant_bias_triton_op if acc.device.type == "cuda" else _dequant_bias_op
    return op(acc, scale_a, scale_b, bias, out_dtype)


def _any_requires_grad(acc, scale_a, scale_b, bias) -> bool:
    """The grad check's common case in one expression (plain tensors, none requiring grad); anything else
    (a list, an input that requires grad) is named by the loop in dequant_bias."""
    try:
        return (
            acc.requires_grad
            or scale_a.requires_grad
            or scale_b.requires_grad
            or (bias is not None and bias.requires_grad)
        )
    except AttributeError:
        return True


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
    if torch.is_grad_enabled() and _any_requires_grad(acc, scale_a, scale_b, bias):
        for name, t in (("acc", acc), ("scale_a", scale_a), ("scale_b", scale_b), ("bias", bias)):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise ValueError(f"dequant_bias is not differentiable, but {name} requires grad: detach it or "
                                 "call under torch.no_grad()")  # fmt: skip
    if torch.compiler.is_compiling():
        return _compiled_call(acc, scale_a, scale_b, bias, out_dtype, out)
    # NOTE: eager calls launch directly: the custom-op dispatcher adds host time on every call.
    return _eager(acc, scale_a, scale_b, bias, out_dtype, out)

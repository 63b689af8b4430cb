"""NF4/FP4 quantization of float weights into bitsandbytes' 4-bit format, byte-equal with bnb CUDA.

    absmax[b] = max |x| over block b (NaN ignored; a block of NaN only: -FLT_MAX, bnb's starting value)
    s[i]      = fl(x[i] * fl(1 / absmax[i // blocksize]))          the reciprocal, then one product (bnb)
    NF4:  code = #{t in NF4_THRESHOLDS : s > t}                     bnb's decision tree, as a count
    FP4:  code = (8 if s < 0) | FP4_RANK_CODES[#{t in FP4_THRESHOLDS : |s| > t}]
    byte j = code(2j) << 4 | code(2j + 1); an odd count pads the last low nibble with the code of 0 * r

The thresholds are bnb's literals (tritonbits.formats, docs/format.md "Quantize"). Consequences, all as bnb
CUDA: NaN gets code 0 (every comparison is false); a zero block has absmax 0, r = inf and 0 * inf = NaN, so
all its codes are 0 (NF4 code 0 is -1.0: it dequantizes to -0.0); an Inf makes r = 0, its own code 0 (inf * 0
= NaN) and the rest of its block the code of 0 (-0.0 gets no FP4 sign bit: -0.0 < 0 is false).

Encoders (constexpr ENCODER, all exact, all tested equal). "round": the bucket is the bit pattern of
v = fl(1.5 * 2**23 + K - K * s) (FP4: of |s|), an fp32 whose ulp is 1, so the add itself rounds to an
integer bucket with no float->int conversion, clamped (min first, so NaN lands in the lowest-code bucket);
one int64 entry per bucket holds its threshold and the code pair: one 8-byte load, one compare, one select.
"lean" (default): round's buckets and codes with one clamp and, for FP4, the sign from the bit pattern of
fl(s + 0.0) (encode_4bit_lean, lean_table); H100: FP4 1.7-4.2% faster than round, NF4 the same.
"compare" counts thresholds with 15 (NF4) or 7
(FP4) compares per value; "bucket" looks the count up: b = clamp(floor(fl(s + 1) * 16)) (NF4; FP4 uses
floor(|s| * 16)), then count = base[b] + (s > thr[b]), where the host table (built once per device from the
same thresholds with the same fp32 ops) holds, per bucket, the number of thresholds in lower buckets and
the bucket's one threshold (+inf if none). bucket() is monotone and computed identically for s and for
the thresholds, so the lookup equals the count; every bucket holds at most one threshold (checked when
the table is built). The table stores the two candidate codes (base and base + 1, mapped to FP4 bits) in
one int32, so a value costs two table loads.

Launches: one (packed bytes and fp32 absmax). compress_statistics=True: three, as bnb's sequence needs
them: the 4-bit kernel; offset = absmax.mean(), a torch reduction (reproducing torch's summation order in
a kernel would be fragile, and bnb's offset IS that reduction); then the 8-bit kernel of
ops/blockwise_8bit.py on fl(absmax - offset) (the subtraction is done in that kernel, one fp32 rounding as
torch's) with the dynamic code, blocksize 256. No host sync anywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _runtime, formats
from .._launcher import BoundLaunch, CachedLauncher
from .._triton_helpers import abs_f32, gather, mul_ftz, reciprocal
from ..quant_state import NestedState, QuantState, check_tensor
from . import blockwise_8bit as b8
from .blockwise_8bit import FLT_MAX, FLT_MIN, block_absmax

# NOTE: a program quantizes max(1, TILE // blocksize) whole blocks (one row each, one row reduction for
# the absmax). Measured with the bucket encoder only (H100, docs/kernels/quantize_4bit.md): 54-56% of copy for
# bf16 plain, 83% for fp32; TILE, warps and the compare encoder were not swept.
TILE = 4096
# NOTE: "round" (one 8-byte table entry a value, no float->int conversion) compiles to ~half the SASS of
# "bucket" for bf16 NF4 (sm90 offline compile, counts in docs/kernels/quantize_4bit.md); "lean" (round with fewer
# instructions) measured 1.7-4.2% faster for FP4 and the same for NF4 (H100, ci/quantize_probe.py, log 1630Z).
ENCODER_DEFAULT = "lean"
ENCODERS = ("round", "lean", "bucket", "compare")
BUCKETS_PER_UNIT = 16  # K: a power of two, so fl(s + 1) * K is exact; bucket width 1/16 < every threshold gap
# "round": v = fl(MAGIC + K * (1 - s)) (FP4: of |s|, MAGIC + K - K * |s|); fl() rounds to an integer because
# MAGIC = 1.5 * 2**23 (ulp 1), so v's bit pattern minus MAGIC's is round(K * (1 - s)) + K0, monotone
# (decreasing) in s. K * s is exact (K a power of two), so the product and the sum round once whether or not
# they are fused into an FMA: the host builds its table with the same operations.
ROUND_MAGIC = 12582912.0  # 1.5 * 2**23
ROUND_MAGIC_BITS = 0x4B400000
MAGIC_BITS: tl.constexpr = tl.constexpr(ROUND_MAGIC_BITS)


@triton.jit
def encode_4bit(s, thr_ptr, codes_ptr, FP4: tl.constexpr, ENCODER: tl.constexpr, N_THR: tl.constexpr,
                K: tl.constexpr, NB: tl.constexpr, FTZ: tl.constexpr):  # fmt: skip
    """4-bit codes (int32) of fp32 scaled values s: bnb's dQuantizeNF4 / dQuantizeFP4 (see the module doc).
    "bucket": thr_ptr/codes_ptr are the NB-entry bucket tables; "compare": the N_THR sorted thresholds and
    the rank -> code table. FTZ: how |s| is spelled (abs_f32)."""
    a = abs_f32(s, FTZ) if FP4 else s
    if ENCODER == "bucket":
        u = a * K if FP4 else (a + 1.0) * K
        u = tl.where(u != u, 0.0, u)
        u = tl.minimum(tl.maximum(u, 0.0), NB - 1.0)
        b = u.to(tl.int32)
        pair = tl.load(codes_ptr + b)
        code = tl.where(a > tl.load(thr_ptr + b), pair >> 8, pair & 0xFF)
    else:
        rank = tl.zeros(s.shape, tl.int32)
        for k in tl.static_range(N_THR):
            rank += (a > tl.load(thr_ptr + k)).to(tl.int32)
        code = tl.load(codes_ptr + rank) if FP4 else rank
    if FP4:
        code = code | tl.where(s < 0, 8, 0)
    return code


@triton.jit
def encode_4bit_round(s, tab_ptr, FP4: tl.constexpr, K: tl.constexpr, NB: tl.constexpr, MAGIC: tl.constexpr,
                      FTZ: tl.constexpr):  # fmt: skip
    """4-bit codes (int32) of fp32 scaled values s with the int64 "round" table (round_table): the scalar
    base tab_ptr - MAGIC_BITS is indexed by the rounded float's bit pattern directly. Entry e:
    low 32 bits the bucket's threshold (fp32; +inf if none), high 32 bits the code pair (not above | above << 8).
    The clamps run min first: NaN -> the last bucket (s = -1, whose lower code is 0) and s = +inf (an fp32
    absmax below 2**-126, flushed by rcp.approx) -> bucket 0 (s = +1). FTZ: how |s| is spelled (abs_f32)."""
    a = abs_f32(s, FTZ) if FP4 else s
    v = tl.maximum(tl.minimum(MAGIC + K - a * K, MAGIC + NB - 1.0), MAGIC)
    e = gather((tab_ptr - MAGIC_BITS) + v.to(tl.int32, bitcast=True), FTZ)
    thr = e.to(tl.int32).to(tl.float32, bitcast=True)
    pair = (e >> 32).to(tl.int32)
    code = tl.where(a > thr, pair >> 8, pair) & 0xF
    if FP4:
        code = code | tl.where(s < 0, 8, 0)
    return code


@triton.jit
def encode_4bit_lean(s, tab_ptr, FP4: tl.constexpr, K: tl.constexpr, NB: tl.constexpr, MAGIC: tl.constexpr,
                     FTZ: tl.constexpr):  # fmt: skip
    """ "round" with fewer instructions a value, the same codes (lean_table; docs/kernels/quantize_4bit.md):
    - one clamp (min: NaN -> the last bucket). The max clamp of "round" never acts: |s| <= |x| * fl(1/absmax)
      (1 + 2**-23) <= 1 + 2**-21 (rcp.approx is within 2**-22 of 1/absmax), so K - K * |s| > -0.5 rounds to 0.
    - FP4: the sign from s's bit pattern, no compare: fl(s + 0.0) is s except that -0.0 becomes +0.0, whose
      sign bit is clear as `s < 0` is false, so bit 31 is `s < 0` for every non-NaN s. The table's codes carry
      bit 3 ("sign allowed") in every bucket but the NaN-only bucket NB - 1 (K + 1: |s| <= 1 + 2**-21 never
      rounds there), so `code & (bits >> 28 | 7)` adds the sign bit and NaN keeps code 0 whatever its sign."""
    if FP4:
        s = s + 0.0
    a = abs_f32(s, FTZ) if FP4 else s
    v = tl.minimum(MAGIC + K - a * K, MAGIC + NB - 1.0)
    e = gather((tab_ptr - MAGIC_BITS) + v.to(tl.int32, bitcast=True), FTZ)
    thr = e.to(tl.int32).to(tl.float32, bitcast=True)
    pair = (e >> 32).to(tl.int32)
    code = tl.where(a > thr, pair >> 8, pair)
    keep = ((s.to(tl.uint32, bitcast=True) >> 28) | 7).to(tl.int32) if FP4 else 0xF  # FP4: 15 if s < 0, else 7
    return code & keep


@triton.jit
def encode_any(s, thr_ptr, codes_ptr, FP4: tl.constexpr, ENCODER: tl.constexpr, N_THR: tl.constexpr,
               K: tl.constexpr, NB: tl.constexpr, MAGIC: tl.constexpr, FTZ: tl.constexpr):  # fmt: skip
    if ENCODER == "round":
        return encode_4bit_round(s, thr_ptr, FP4, K, NB, MAGIC, FTZ)
    elif ENCODER == "lean":
        return encode_4bit_lean(s, thr_ptr, FP4, K, NB, MAGIC, FTZ)
    else:
        return encode_4bit(s, thr_ptr, codes_ptr, FP4, ENCODER, N_THR, K, NB, FTZ)


@triton.jit
def _quantize_4bit_kernel(
    x_ptr, packed_ptr, absmax_ptr, thr_ptr, codes_ptr,
    n_elements, n_bytes, n_bytes_alloc, n_blocks, code_src_ptr, code_out_ptr,
    BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, FP4: tl.constexpr, ENCODER: tl.constexpr,
    N_THR: tl.constexpr, K: tl.constexpr, NB: tl.constexpr, RCP: tl.constexpr, PAIRS: tl.constexpr,
    IN_BF16: tl.constexpr, MAGIC: tl.constexpr, FTZ: tl.constexpr, ZERO_PAD: tl.constexpr, WRITE_CODE: tl.constexpr,
):  # fmt: skip
    """One program quantizes ROWS whole blocks: ROWS x BLOCKSIZE values in, ROWS x BLOCKSIZE/2 bytes and ROWS
    absmax out. int64 base per program, int32 within the tile. Bytes in [n_bytes, n_bytes_alloc) (the
    padding of a quant_storage wider than a byte) are written as 0; ZERO_PAD: whether there are any (else the
    store mask alone is right and the per-byte select is left out).
    PAIRS: x_ptr is an integer view of the input with one element pair (2j, 2j+1) a word (n even, aligned),
    so that each thread's words map to its output bytes without a layout change; IN_BF16 / fp16 / fp32 by the
    word width. Else x_ptr is the float input (any n) and the pairs are split from a [ROWS, HALF, 2] tile.
    WRITE_CODE: program 0 also copies the 16 code values (code_src_ptr) to code_out_ptr, the quant state's own
    copy, which would otherwise take a launch of its own (a clone)."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, ROWS)
    byte_local = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    byte_base = pid * (ROWS * HALF)
    if PAIRS:
        # word j holds elements 2j (low half, little-endian) and 2j + 1; n even, so words = n // 2 = n_bytes
        w = tl.load(
            x_ptr + byte_base + byte_local,
            mask=byte_local < tl.minimum(n_bytes - byte_base, ROWS * HALF).to(tl.int32),
            other=0,
        )
        if w.dtype == tl.int64:
            even = w.to(tl.int32).to(tl.float32, bitcast=True)
            odd = (w >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        elif IN_BF16:
            even = (w << 16).to(tl.float32, bitcast=True)
            odd = (w & -65536).to(tl.float32, bitcast=True)
        else:
            even = w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            odd = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        # NaN ignored by max (maxnum on the GPU, nanmax in the interpreter); a row of NaN only gives NaN,
        # which the outer maximum turns into -FLT_MAX (bnb's starting value)
        absmax = tl.maximum(tl.max(tl.maximum(abs_f32(even, FTZ), abs_f32(odd, FTZ)), axis=1), -FLT_MAX)
    else:
        base = pid * (ROWS * BLOCKSIZE)
        local = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        left = tl.minimum(n_elements - base, ROWS * BLOCKSIZE).to(tl.int32)
        x = tl.load(x_ptr + base + local, mask=local < left, other=0.0).to(tl.float32)
        absmax = block_absmax(x)
        even, odd = tl.split(tl.reshape(x, (ROWS, HALF, 2)))

    # bnb (--use_fast_math) flushes subnormals: a block whose absmax is below 2**-126 stores absmax 0 and, its
    # values flushed to 0 times 1/0, all NaN (code 0), as an all-zero block does; r = NaN gives both that
    absmax = tl.where((absmax > 0) & (absmax < FLT_MIN), 0.0, absmax)
    block = pid * ROWS + rows
    tl.store(absmax_ptr + block, absmax, mask=block < n_blocks)

    r = tl.where(absmax == 0, float("nan"), reciprocal(absmax, RCP))[:, None]
    # bnb's x * r is mul.ftz (fast math): a subnormal x, or a product below 2**-126, scales to a signed zero
    hi = encode_any(mul_ftz(even, r, FTZ), thr_ptr, codes_ptr, FP4, ENCODER, N_THR, K, NB, MAGIC, FTZ)
    lo = encode_any(mul_ftz(odd, r, FTZ), thr_ptr, codes_ptr, FP4, ENCODER, N_THR, K, NB, MAGIC, FTZ)
    packed = ((hi << 4) | lo).to(tl.uint8)

    if ZERO_PAD:
        packed = tl.where(byte_local < tl.minimum(n_bytes - byte_base, ROWS * HALF).to(tl.int32), packed, 0)
    alloc_left = tl.minimum(n_bytes_alloc - byte_base, ROWS * HALF).to(tl.int32)
    tl.store(packed_ptr + byte_base + byte_local, packed, mask=byte_local < alloc_left)
    if WRITE_CODE:  # noqa: SIM102 (a constexpr branch around a runtime one)
        if tl.program_id(0) == 0:
            c = tl.arange(0, 16)
            tl.store(code_out_ptr + c, tl.load(code_src_ptr + c))


_launcher = CachedLauncher(_quantize_4bit_kernel)

# ---------------------------------------------------------------------------------------------------
# Encoder tables, built once per (quant_type, encoder, device) from tritonbits.formats.

_TABLES: dict[tuple[str, str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def bucket_tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(thr float32[NB], pair int32[NB]) on the CPU: per bucket its threshold (+inf if none) and the codes for
    "not above" | "above" << 8. Bucket of v: clamp(floor(fl(v + 1) * K), 0, NB - 1) (FP4: of |v|, no + 1),
    the kernel's fp32 ops."""
    fp4 = quant_type == "fp4"
    thresholds = torch.tensor(formats.FP4_THRESHOLDS if fp4 else formats.NF4_THRESHOLDS, dtype=torch.float32)
    rank_codes = list(formats.FP4_RANK_CODES) if fp4 else list(range(16))
    k = BUCKETS_PER_UNIT
    nb = k if fp4 else 2 * k
    u = thresholds * k if fp4 else (thresholds + 1.0) * k
    buckets = u.clamp(0.0, nb - 1.0).to(torch.int32).tolist()
    if len(set(buckets)) != len(buckets):
        raise AssertionError(f"{quant_type}: two thresholds share a bucket at K={k}: {buckets}")
    thr = torch.full((nb,), float("inf"), dtype=torch.float32)
    pair = torch.empty(nb, dtype=torch.int32)
    for b in range(nb):
        base = sum(1 for t in buckets if t < b)
        if b in buckets:
            thr[b] = thresholds[buckets.index(b)]
        above = rank_codes[base + 1] if base + 1 < len(rank_codes) else 0
        pair[b] = rank_codes[base] | above << 8
    return thr, pair


def round_bucket(v: torch.Tensor, quant_type: str) -> torch.Tensor:
    """The "round" encoder's bucket of fp32 values v (|v| for FP4) in [-1, 1], with the kernel's fp32 ops."""
    k = float(BUCKETS_PER_UNIT)
    a = v.abs() if quant_type == "fp4" else v
    u = torch.tensor(ROUND_MAGIC + k, dtype=torch.float32) - a * k
    return u.view(torch.int32) - ROUND_MAGIC_BITS


def round_table(quant_type: str) -> torch.Tensor:
    """int64[NB] on the CPU for encode_4bit_round: per bucket b (b = round(K * (1 - s)), decreasing in s; NB =
    2K + 1 for NF4, K + 1 for FP4 on |s|), low 32 bits: the fp32 bits of its one threshold (+inf if none); high
    32 bits: code(base) | code(base + 1) << 8, base = #thresholds in higher buckets (all below every value of
    the bucket, since the bucket function decreases)."""
    fp4 = quant_type == "fp4"
    thresholds = torch.tensor(formats.FP4_THRESHOLDS if fp4 else formats.NF4_THRESHOLDS, dtype=torch.float32)
    rank_codes = list(formats.FP4_RANK_CODES) if fp4 else list(range(16))
    nb = BUCKETS_PER_UNIT + 1 if fp4 else 2 * BUCKETS_PER_UNIT + 1
    buckets = round_bucket(thresholds, quant_type).tolist()
    if len(set(buckets)) != len(buckets) or not all(0 <= b < nb for b in buckets):
        raise AssertionError(f"{quant_type}: thresholds share a bucket or leave the table: {buckets}")
    thr = torch.full((nb,), float("inf"), dtype=torch.float32)
    pair = torch.empty(nb, dtype=torch.int64)
    for b in range(nb):
        base = sum(1 for t in buckets if t > b)
        if b in buckets:
            thr[b] = thresholds[buckets.index(b)]
        above = rank_codes[base + 1] if base + 1 < len(rank_codes) else 0
        pair[b] = rank_codes[base] | above << 8
    return (thr.view(torch.int32).to(torch.int64) & 0xFFFFFFFF) | (pair << 32)


def lean_table(quant_type: str) -> torch.Tensor:
    """int64 table of encode_4bit_lean: NF4, round_table's; FP4, round_table's 17 entries with bit 3 set in both
    codes ("sign allowed"), then a NaN-only bucket (threshold +inf, codes 0)."""
    table = round_table(quant_type)
    if quant_type != "fp4":
        return table
    sign_ok = (0x8 | 0x8 << 8) << 32
    nan_only = torch.tensor([0x7F800000], dtype=torch.int64)
    return torch.cat([table | sign_ok, nan_only])


def encoder_tables(quant_type: str, encoder: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(thr, codes) kernel arguments; for "round" and "lean" both are the one int64 table."""
    key = (quant_type, encoder, device)
    tables = _TABLES.get(key)
    if tables is None:
        if encoder == "round":
            thr = codes = round_table(quant_type)
        elif encoder == "lean":
            thr = codes = lean_table(quant_type)
        elif encoder == "bucket":
            thr, codes = bucket_tables(quant_type)
        else:
            fp4 = quant_type == "fp4"
            thr = torch.tensor(formats.FP4_THRESHOLDS if fp4 else formats.NF4_THRESHOLDS, dtype=torch.float32)
            codes = torch.tensor(formats.FP4_RANK_CODES if fp4 else range(16), dtype=torch.int32)
        thr = thr.to(device)
        tables = _TABLES[key] = (thr, thr if encoder in ("round", "lean") else codes.to(device))
    return tables


# ---------------------------------------------------------------------------------------------------
# Launch


def packed_bytes(n: int, quant_storage: torch.dtype) -> int:
    """Bytes allocated for n values: (n + 1) // 2, rounded up to whole quant_storage elements."""
    size = quant_storage.itemsize
    return -(-((n + 1) // 2) // size) * size


CODE_SRC_ARG, CODE_OUT_ARG = 9, 10  # plan()'s args: the positions of the code table and of code_out


def plan(x, packed, absmax, blocksize: int, quant_type: str, *, encoder: str | None = None,
         num_warps: int | None = None, rcp: str | None = None, pairs: bool | None = None,
         code_out: torch.Tensor | None = None):  # fmt: skip
    """(grid, args, constexprs, options) of one launch; `x` flat contiguous, `packed` uint8 bytes.
    pairs: read element pairs as words (default: where n is even and x aligned); the probe and tests force it.
    code_out: fp32[16] that the launch fills with the format's code values (argument CODE_OUT_ARG), or None."""
    encoder = ENCODER_DEFAULT if encoder is None else encoder
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    if pairs not in (None, True, False):
        raise ValueError(f"pairs must be None, True or False, got {pairs!r}")
    n = x.numel()
    rows = max(TILE // blocksize, 1)
    thr, codes = encoder_tables(quant_type, encoder, x.device)
    grid = (_runtime.cdiv(n, rows * blocksize), 1, 1)
    n_bytes_alloc = packed.numel()
    assert n_bytes_alloc <= grid[0] * rows * blocksize // 2 + (blocksize // 2 if n == 0 else 0)
    word = {2: torch.int32, 4: torch.int64}[x.element_size()]
    # a traced x (no address): element reads, right at any alignment
    can_pair = n % 2 == 0 and _runtime.address_aligned(x, word.itemsize) is True
    if pairs and not can_pair:
        raise ValueError("pairs=True needs an even element count and an input aligned to two elements")
    pairs = can_pair if pairs is None else pairs
    args = (x.view(word) if pairs else x, packed, absmax, thr, codes, n, (n + 1) // 2, n_bytes_alloc,
            _runtime.cdiv(n, blocksize), formats.code_table(quant_type, x.device),
            code_out if code_out is not None else absmax)  # fmt: skip
    fp4 = quant_type == "fp4"
    constexprs = {"BLOCKSIZE": blocksize, "ROWS": rows, "FP4": fp4, "ENCODER": encoder,
                  "N_THR": len(formats.FP4_THRESHOLDS if fp4 else formats.NF4_THRESHOLDS),
                  "K": BUCKETS_PER_UNIT, "NB": thr.numel() if encoder in ("bucket", "round", "lean") else 1,
                  "RCP": b8.rcp_mode(x.device, rcp), "PAIRS": pairs, "IN_BF16": x.dtype == torch.bfloat16,
                  "MAGIC": ROUND_MAGIC, "FTZ": _runtime.ftz_mode(x.device),
                  "ZERO_PAD": n_bytes_alloc != (n + 1) // 2, "WRITE_CODE": code_out is not None}  # fmt: skip
    options = {"num_warps": num_warps if num_warps is not None else (4 if rows * blocksize <= 4096 else 8)}
    return grid, args, constexprs, options


def launch(x, packed, absmax, blocksize: int, quant_type: str, *, kernel=None, **overrides) -> None:
    """Quantize validated arguments: x flat contiguous float, packed uint8 (packed_bytes(n) of them), absmax
    float32 (one per block). `kernel`: the wrap_triton'd kernel (triton_op)."""
    if x.numel() == 0:
        return
    grid, args, constexprs, options = plan(x, packed, absmax, blocksize, quant_type, **overrides)
    if kernel is not None:
        kernel[grid](*args, **constexprs, **options)
    else:
        _launcher(grid, args, constexprs, options, x.device)


def _nested(absmax: torch.Tensor, qabsmax: torch.Tensor, kernel_wrap=None):
    """bnb's double quantization of the fp32 absmax: (offset, absmax2), qabsmax written. `kernel_wrap`
    (torch.library.wrap_triton) is given in the triton_op's body, which Inductor traces: there the mean is the
    opaque tritonbits::absmax_mean, as Inductor would sum it in its own order (1 ulp off bnb's eager mean for
    some sizes; see quantize_blockwise). The 8-bit step takes the "table" encoder (the dynamic code's bucket
    table), as quantize_blockwise does."""
    blocks = absmax.numel()
    offset = b8._absmax_mean_op(absmax) if kernel_wrap is not None else absmax.mean()
    absmax2 = torch.empty(-(-blocks // formats.NESTED_BLOCKSIZE), dtype=torch.float32, device=absmax.device)
    code2 = formats.code_table("dynamic", absmax.device)
    b8.launch_quantize(absmax, code2, qabsmax, absmax2, formats.NESTED_BLOCKSIZE, offset, kernel_wrap=kernel_wrap,
                       encoder="table")  # fmt: skip
    return offset, absmax2


def _run(A, blocksize, quant_type, nested, packed, absmax, kernel=None, kernel8_wrap=None):
    """Everything the op does on validated arguments; packed (uint8 bytes) and absmax (fp32, or uint8 when
    nested) are written. Returns (absmax2, offset), or None when not nested."""
    x = b8._flat(A)
    if not nested:
        launch(x, packed, absmax, blocksize, quant_type, kernel=kernel)
        return None, None
    absmax32 = torch.empty(absmax.numel(), dtype=torch.float32, device=A.device)
    launch(x, packed, absmax32, blocksize, quant_type, kernel=kernel)
    offset, absmax2 = _nested(absmax32, absmax, kernel_wrap=kernel8_wrap)
    return absmax2, offset


# ---------------------------------------------------------------------------------------------------
# torch.library registration. Eager calls launch directly; under torch.compile the public function calls
# the triton_op on CUDA (Inductor sees both kernels and the mean) and the custom ops for CPU tensors.


def _outputs(A: torch.Tensor, blocksize: int, nested: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n = A.numel()
    packed = torch.empty(packed_bytes(n, torch.uint8), dtype=torch.uint8, device=A.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.uint8 if nested else torch.float32, device=A.device)
    return packed, absmax


def _none_as_empty(like: torch.Tensor, absmax2, offset) -> tuple[torch.Tensor, torch.Tensor]:
    """The ops' (absmax2, offset) outputs: empty fp32 tensors when not nested (an op returns tensors)."""
    if absmax2 is None:
        return like.new_empty(0, dtype=torch.float32), like.new_empty(0, dtype=torch.float32)
    return absmax2, offset


@torch.library.custom_op("tritonbits::quantize_4bit", mutates_args=())
def _quantize_4bit_op(
    A: torch.Tensor, blocksize: int, quant_type: str, nested: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 bytes, absmax, absmax2, offset); absmax2 and offset are empty when not nested."""
    packed, absmax = _outputs(A, blocksize, nested)
    absmax2, offset = _run(A, blocksize, quant_type, nested, packed, absmax)
    return packed, absmax, *_none_as_empty(absmax, absmax2, offset)


@_quantize_4bit_op.register_fake
def _(A, blocksize, quant_type, nested):
    n = A.numel()
    blocks = -(-n // blocksize)
    packed = A.new_empty(((n + 1) // 2,), dtype=torch.uint8)
    absmax = A.new_empty((blocks,), dtype=torch.uint8 if nested else torch.float32)
    if nested:
        return (
            packed,
            absmax,
            A.new_empty((-(-blocks // 256),), dtype=torch.float32),
            A.new_empty((), dtype=torch.float32),
        )
    return packed, absmax, A.new_empty((0,), dtype=torch.float32), A.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("tritonbits::quantize_4bit.out", mutates_args=("out", "absmax", "absmax2", "offset"))
def _quantize_4bit_out_op(
    A: torch.Tensor, blocksize: int, quant_type: str, out: torch.Tensor, absmax: torch.Tensor,
    absmax2: torch.Tensor | None, offset: torch.Tensor | None,
) -> None:  # fmt: skip
    """out: the packed bytes (uint8); nested when absmax2 and offset are given (written too)."""
    nested = absmax2 is not None
    got2, got_offset = _run(A, blocksize, quant_type, nested, out, absmax)
    if nested:
        assert absmax2 is not None and offset is not None
        absmax2.copy_(got2)
        offset.copy_(got_offset)


@_quantize_4bit_out_op.register_fake
def _(A, blocksize, quant_type, out, absmax, absmax2, offset):
    return None


def _real_tables(quant_type: str, device: torch.device) -> None:
    """Every table the op reads on `device`, built (see _runtime.outside_fake)."""
    encoder_tables(quant_type, ENCODER_DEFAULT, device)
    b8.table_for(formats.code_table("dynamic", device), device)
    formats.code_table(quant_type, device)


@torch.library.triton_op("tritonbits::quantize_4bit_triton_op", mutates_args=())
def _quantize_4bit_triton_op(
    A: torch.Tensor, blocksize: int, quant_type: str, nested: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _runtime.outside_fake(_real_tables, quant_type, A.device)
    packed, absmax = _outputs(A, blocksize, nested)
    absmax2, offset = _run(A, blocksize, quant_type, nested, packed, absmax,
                           kernel=torch.library.wrap_triton(_quantize_4bit_kernel),
                           kernel8_wrap=torch.library.wrap_triton)  # fmt: skip
    return packed, absmax, *_none_as_empty(absmax, absmax2, offset)


# ---------------------------------------------------------------------------------------------------
# Public function


def _check_args(A, absmax, out, blocksize, compress_statistics, quant_type, quant_storage) -> torch.device:
    device = b8.check_input(A)
    b8.check_blocksize(blocksize, formats.BLOCKSIZES)
    if quant_type not in formats.QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {formats.QUANT_TYPES}, got {quant_type!r}")
    if not isinstance(compress_statistics, bool):
        raise TypeError(f"compress_statistics must be a bool, got {type(compress_statistics).__name__}")
    if quant_storage not in formats.PACKED_DTYPES:
        raise TypeError(f"quant_storage must be one of {', '.join(map(str, formats.PACKED_DTYPES))}, "
                        f"got {quant_storage!r}")  # fmt: skip
    n = A.numel()
    if out is not None:
        size = quant_storage.itemsize
        check_tensor("out", out, (quant_storage,), packed_bytes(n, quant_storage) // size, device)
        _runtime.check_out(out, {"A": A})
    if absmax is not None:
        dtypes = (torch.uint8,) if compress_statistics else (torch.float32,)
        check_tensor("absmax", absmax, dtypes, -(-n // blocksize), device)
        _runtime.check_out(absmax, {"A": A, **({"out": out} if out is not None else {})}, name="absmax")
    return device


def quantize_4bit(
    A: torch.Tensor,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int | None = None,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """`bitsandbytes.functional.quantize_4bit`: (packed, QuantState), byte-equal with bnb CUDA (packed bytes,
    absmax, and when compress_statistics the uint8 absmax, state2.absmax and offset).

    packed: [(n + 1) // 2 bytes, 1] viewed as quant_storage (bnb's shape; where (n + 1) // 2 is not a
    multiple of quant_storage's size, tritonbits rounds the allocation up and zero-fills the extra bytes,
    where bnb's floor-sized buffer is smaller than what its kernel writes). absmax / out: tensors to write
    into (absmax float32, or uint8 when compress_statistics; out with packed's element count, contiguous).
    Non-contiguous A is quantized in its logical order (bnb calls A.contiguous()). NaN/Inf: see the module
    docstring. One launch (compress_statistics: two and a torch mean)."""
    blocksize = 64 if blocksize is None else blocksize
    if absmax is None and out is None and not torch.compiler.is_compiling():
        return _eager(A, blocksize, compress_statistics, quant_type, quant_storage)
    device = _check_args(A, absmax, out, blocksize, compress_statistics, quant_type, quant_storage)
    return _quantize(A, absmax, out, blocksize, compress_statistics, quant_type, quant_storage, device)


def _quantize(A, absmax, out, blocksize, nested, quant_type, quant_storage, device) -> tuple[torch.Tensor, QuantState]:
    """quantize_4bit on validated arguments, compiled or eager (without a plan: absmax/out given, or no values)."""
    n = A.numel()
    size = quant_storage.itemsize
    if torch.compiler.is_compiling():
        op = _quantize_4bit_triton_op if A.device.type == "cuda" else _quantize_4bit_op
        packed_u8, am, absmax2, offset = op(A, blocksize, quant_type, nested)
        if packed_u8.numel() != packed_bytes(n, quant_storage):  # pad to whole quant_storage elements
            packed_u8 = torch.nn.functional.pad(packed_u8, (0, packed_bytes(n, quant_storage) - packed_u8.numel()))
        packed = packed_u8.view(quant_storage).reshape(-1, 1)
        if out is not None:
            packed = out.copy_(packed.view(out.shape))
        if absmax is not None:
            am = absmax.copy_(am)
    else:
        packed = out if out is not None else torch.empty((packed_bytes(n, quant_storage) // size, 1),
                                                         dtype=quant_storage, device=device)  # fmt: skip
        if absmax is None:
            absmax = torch.empty(-(-n // blocksize), dtype=torch.uint8 if nested else torch.float32, device=device)
        am = absmax
        absmax2, offset = _run(A, blocksize, quant_type, nested, packed.view(-1).view(torch.uint8), am)
    state = QuantState(absmax=am, shape=A.shape, dtype=A.dtype, blocksize=blocksize, quant_type=quant_type,
                       code=formats.code_table(quant_type, device).clone())  # fmt: skip
    if nested:
        state.offset = offset
        state.state2 = NestedState(absmax=absmax2, code=formats.code_table("dynamic", device).clone(),
                                   blocksize=formats.NESTED_BLOCKSIZE)  # fmt: skip
    return packed, state


# ---------------------------------------------------------------------------------------------------
# Eager calls without absmax/out (how models quantize): validated once per argument combination, launched
# through bound launches. NOTE: _EAGER maps what _check_args reads (A's type, dtype and device, and whether CPU
# tensors may run: _runtime.INTERPRET; every other argument with its type: 64.0, True or a str subclass is not 64
# or "nf4") to the plans of the validated combination; a miss (any other value, an unhashable one included) runs
# _check_args, which refuses what it refuses. A plan is keyed by what the launches depend on beyond that: the
# element count and x's address mod 16 (Triton's 16-byte specialization, and whether the 4-bit kernel reads
# element pairs as words); every other tensor of the call is a fresh torch.empty (16-byte aligned) or mean()
# result, so the plan binds each launch with those tensors as its slots (the 4-bit kernel's x, packed, absmax;
# the nested 8-bit kernel's input, offset, output, absmax2; each kernel's code_out, the state's code copy that
# its program 0 writes, where the other path clones the table: two launches fewer) and holds the tables the
# launches read. Measured host time, CPU under stubbed launches (ci/quantize_host_cpu_probe.py --compare, 5
# rounds, against c14eaf5; bf16 256x4096 and 1024x4096, bs64): plain 19.0 -> 7.3 us (0.38x), nested 43-45 ->
# 15-16 us (0.34-0.36x), nf4 and fp4 alike; on the GPU: docs/kernels/quantize_4bit.md, "Host time".
EAGER_MAX = 64  # argument combinations kept, each with at most EAGER_MAX plans (oldest dropped first)
_EAGER: dict[tuple, dict[tuple, _EagerPlan]] = {}
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


class _EagerPlan:
    """The launches of one validated eager call shape (see the NOTE above _EAGER)."""

    def __init__(self, n: int, blocksize: int, quant_type: str, nested: bool, quant_storage: torch.dtype,
                 device: torch.device):  # fmt: skip
        self.blocksize, self.quant_type, self.nested, self.device = blocksize, quant_type, nested, device
        self.blocks = -(-n // blocksize)
        self.blocks2 = -(-self.blocks // formats.NESTED_BLOCKSIZE)
        self.storage = quant_storage
        self.packed_shape = (packed_bytes(n, quant_storage) // quant_storage.itemsize, 1)
        self.word: torch.dtype | None = None  # the 4-bit kernel's view of x (element pairs), once planned
        self.q4: BoundLaunch | None = None  # once launched
        self.q8: BoundLaunch | None = None
        self.tables4: tuple = ()  # what each bound launch reads besides its slots (kept alive)
        self.tables8: tuple = ()

    def run(self, A: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, QuantState]:
        device, nested = self.device, self.nested
        packed = torch.empty(self.packed_shape, dtype=self.storage, device=device)
        packed_u8 = packed if self.storage is torch.uint8 else packed.view(torch.uint8)
        absmax = torch.empty(self.blocks, dtype=torch.uint8 if nested else torch.float32, device=device)
        absmax32 = torch.empty(self.blocks, dtype=torch.float32, device=device) if nested else absmax
        xw = x if self.word is None else x.view(self.word)
        code = torch.empty(16, dtype=torch.float32, device=device)  # the states' code copies: the kernels fill them
        if self.q4 is None or not self.q4(xw, packed_u8, absmax32, code):
            self._launch_4bit(x, packed_u8, absmax32, code)
        state = QuantState(absmax=absmax, shape=A.shape, dtype=A.dtype, blocksize=self.blocksize,
                           quant_type=self.quant_type, code=code)  # fmt: skip
        if nested:
            offset = absmax32.mean()
            absmax2 = torch.empty(self.blocks2, dtype=torch.float32, device=device)
            code2 = torch.empty(256, dtype=torch.float32, device=device)
            if self.q8 is None or not self.q8(absmax32, offset, absmax, absmax2, code2):
                self._launch_8bit(absmax32, absmax, absmax2, offset, code2)
            state.offset = offset
            state.state2 = NestedState(absmax=absmax2, code=code2, blocksize=formats.NESTED_BLOCKSIZE)
        return packed, state

    def _launch_4bit(self, x, packed_u8, absmax32, code) -> None:
        """launch() writing the state's code copy, then bind it (x, packed, absmax, the code copy: args 0-2 and
        CODE_OUT_ARG)."""
        grid, args, constexprs, options = plan(x, packed_u8, absmax32, self.blocksize, self.quant_type, code_out=code)
        _launcher(grid, args, constexprs, options, self.device)
        self.word = args[0].dtype if constexprs["PAIRS"] else None
        self.q4 = _launcher.bind(grid, args, constexprs, options, self.device, slots=(0, 1, 2, CODE_OUT_ARG))
        self.tables4 = (args[3], args[4], args[CODE_SRC_ARG])

    def _launch_8bit(self, absmax32, qabsmax, absmax2, offset, code2_out) -> None:
        """_nested's b8.launch_quantize (the "table" encoder) writing state2's code copy, then bind it (input,
        offset, output, absmax2, the code copy: args 0, 1, 3, 4 and b8.CODE_OUT_ARG)."""
        code2 = formats.code_table("dynamic", self.device)  # as _nested: table_for checks it by identity
        blocksize2 = formats.NESTED_BLOCKSIZE
        grid, args, constexprs, options = b8.plan_quantize(absmax32, code2, qabsmax, absmax2, blocksize2, offset,
                                                           encoder="table", code_out=code2_out)  # fmt: skip
        b8._quantize_launcher(grid, args, constexprs, options, self.device)
        slots = (0, 1, 3, 4, b8.CODE_OUT_ARG)
        self.q8 = b8._quantize_launcher.bind(grid, args, constexprs, options, self.device, slots=slots)
        self.tables8 = (args[2], args[b8.CODE_SRC_ARG])


def _eager(A, blocksize, compress_statistics, quant_type, quant_storage) -> tuple[torch.Tensor, QuantState]:
    """quantize_4bit without absmax/out, eager (see the NOTE above _EAGER)."""
    plans: dict | None = None
    key: tuple | None = None
    if type(A) in _TENSOR_TYPES:
        key = (type(A), A.dtype, A.device, _runtime.INTERPRET, type(blocksize), blocksize, type(compress_statistics),
               compress_statistics, type(quant_type), quant_type, type(quant_storage), quant_storage)  # fmt: skip
        try:
            plans = _EAGER.get(key)
        except TypeError:  # an unhashable argument: _check_args refuses it
            key = None
    if plans is None:
        _check_args(A, None, None, blocksize, compress_statistics, quant_type, quant_storage)
        plans = {}
        if key is not None:
            _runtime.put_bounded(_EAGER, key, plans, EAGER_MAX)
    device = A.device
    x = b8._flat(A)
    n = x.numel()
    if n == 0:
        return _quantize(A, None, None, blocksize, compress_statistics, quant_type, quant_storage, device)
    shape_key = (n, x.data_ptr() % 16)
    p = plans.get(shape_key)
    if p is None:
        plan = _EagerPlan(n, blocksize, quant_type, compress_statistics, quant_storage, device)
        p = _runtime.put_bounded(plans, shape_key, plan, EAGER_MAX)
    return p.run(A, x)

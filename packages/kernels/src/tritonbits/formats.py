"""The bitsandbytes formats as constants: 4-bit code tables, blocksizes, dtypes, the 8-bit dynamic code.

Every op reads its format facts from here (docs/format.md explains them). The values are written out from
their definitions; tritonbits never imports bitsandbytes, and the oracles in tritonbits_reference compute
the same tables independently.
"""

from __future__ import annotations

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bnb accepts for 4-bit and 8-bit blockwise
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # weights in, dequantized weights out
PACKED_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32, torch.int16, torch.int32)
NESTED_BLOCKSIZE = 256  # bnb quantizes the 4-bit absmax with the 8-bit dynamic code in blocks of 256

# NormalFloat4: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA, appendix E), as bnb stores them in fp32.
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# FP4 magnitudes for codes 0..7; codes 8..15 are their negatives. bnb divides by 12 in fp32.
FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)

# The quantizer's decision thresholds, as bnb's CUDA decision trees spell them (dQuantizeNF4 / dQuantizeFP4,
# csrc/kernels.cu; docs/format.md, "Quantize"): float literals, rounded to fp32 by the C compiler. A scaled
# value x gets the NF4 code = the number of thresholds t with x > t (NaN: 0). FP4: sign bit 8 when x < 0
# (not for -0.0, not for NaN), magnitude rank = the number of FP4_THRESHOLDS below |x|, code bits from
# FP4_RANK_CODES. These are the midpoints between neighbouring code values, written in decimal by bnb.
NF4_THRESHOLDS = (
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
)  # fmt: skip
FP4_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
FP4_RANK_CODES = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)  # magnitude rank -> code bits
BLOCKSIZES_8BIT = (64, 128, 256, 512, 1024, 2048, 4096)  # what bnb's CUDA quantize_blockwise accepts


def code_values(quant_type: str) -> torch.Tensor:
    """The 16 float32 values of a 4-bit code, indexed by the nibble."""
    if quant_type == "nf4":
        return torch.tensor(NF4, dtype=torch.float32)
    if quant_type == "fp4":
        magnitudes = torch.tensor(FP4_MAGNITUDES, dtype=torch.float32)
        return torch.cat([magnitudes, -magnitudes]) / 12.0
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def dynamic_code() -> torch.Tensor:
    """bnb's signed 8-bit dynamic code (create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)):
    for exponent level e = 0..6, the midpoints of linspace(0.1, 1, 2**e + 1) (float32) times 10**(e-6),
    both signs; then 0 and 1; padded with zeros to 256 and sorted. float32[256]."""
    values: list[float] = []
    for exponent in range(7):
        boundaries = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (exponent - 6)
        values += (scale * means).tolist() + (-scale * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float64).to(torch.float32)


_tables: dict[tuple[str, torch.device], torch.Tensor] = {}


def code_table(name: str, device: torch.device) -> torch.Tensor:
    """A code table ("nf4", "fp4" or "dynamic") as a float32 tensor on `device`, made once per device (a CUDA
    device without an index is the current one: one object for "cuda" and "cuda:0", which the 8-bit quantizer's
    bucket-table encoders' check compares by identity). While dynamo traces a caller it is a copy instead
    (tritonbits::code_table, below): a compiled call never passes the cached object, so its 8-bit quantize takes
    the binary search (the same bytes)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if torch.compiler.is_dynamo_compiling():  # dynamo tracing a caller: see _code_table_op
        return torch.ops.tritonbits.code_table(name, device)
    return _cached_table(name, device)


def _cached_table(name: str, device: torch.device) -> torch.Tensor:
    key = (name, device)
    table = _tables.get(key)
    if table is None:
        table = _tables[key] = _VALUES[name].to(device)
    return table


# NOTE: code_table as dynamo sees it (is_dynamo_compiling: true only while dynamo traces Python, not while a
# triton_op body is traced, which reads the real cached tables): an opaque op returning a copy of the cached
# table (at most 256 floats: one small device copy a call in a compiled graph). Traced instead, the cache lookup
# put a guard "key not in _tables" on the frame, and the triton_op bodies, which build the real tables while the
# graph is compiled, broke it before dynamo checked it on the same frame ("Guard failed on the same frame it was
# created": a first, compiled quantize_blockwise, H100 record 20261123T174959Z). torch.compiler.
# assume_constant_result, tried first, fails on torch 2.11 when a frame reads two tables (both constants get one
# source name: "already in seen_sources", record 20261123T175940Z).
@torch.library.custom_op("tritonbits::code_table", mutates_args=())
def _code_table_op(name: str, device: torch.device) -> torch.Tensor:
    from ._runtime import outside_fake

    return outside_fake(_cached_table, name, device).clone()


@_code_table_op.register_fake
def _(name: str, device: torch.device) -> torch.Tensor:
    return torch.empty(_VALUES[name].numel(), dtype=torch.float32, device=device)


# Built at import, so that a first call inside torch.compile only copies them to the device (tracing
# dynamic_code() would break the graph: dynamo does not trace tolist() on float tensors).
_VALUES = {"nf4": code_values("nf4"), "fp4": code_values("fp4"), "dynamic": dynamic_code()}

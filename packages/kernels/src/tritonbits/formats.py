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
    """A code table ("nf4", "fp4" or "dynamic") as a float32 tensor on `device`, made once per device."""
    key = (name, device)
    table = _tables.get(key)
    if table is None:
        values = dynamic_code() if name == "dynamic" else code_values(name)
        table = _tables[key] = values.to(device)
    return table

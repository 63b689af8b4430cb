"""tritonbits' own QuantState, built from any object that carries bitsandbytes' QuantState fields.

tritonbits never imports bitsandbytes: `QuantState.from_any` reads the fields by name (duck typing), so a
bnb QuantState, a bnb Params4bit's `.quant_state`, or any look-alike works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class NestedState:
    absmax: torch.Tensor  # float32, one per `blocksize` 4-bit absmax values
    code: torch.Tensor  # float32[256], the 8-bit dynamic code
    blocksize: int


@dataclass
class QuantState:
    """Everything a 4-bit dequantization needs, with bnb's field names."""

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    offset: torch.Tensor | None = None
    state2: NestedState | None = None
    code: torch.Tensor | None = None  # kept for bnb compatibility; the kernel uses the canonical table

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def from_any(cls, obj) -> QuantState:
        """Read bnb's fields off `obj` (bnb QuantState, tritonbits QuantState or a look-alike)."""
        if isinstance(obj, QuantState):
            return obj
        missing = [f for f in ("absmax", "shape", "dtype", "blocksize", "quant_type") if not hasattr(obj, f)]
        if missing:
            raise TypeError(f"quant_state has no {', '.join(missing)}: pass a bitsandbytes QuantState or an "
                            "object with its fields")  # fmt: skip
        state2 = None
        s2 = getattr(obj, "state2", None)
        if s2 is not None:
            state2 = NestedState(absmax=s2.absmax, code=s2.code, blocksize=int(s2.blocksize))
        offset = getattr(obj, "offset", None)
        if offset is not None and not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=obj.absmax.device)
        return cls(
            absmax=obj.absmax,
            shape=torch.Size(obj.shape),
            dtype=obj.dtype,
            blocksize=int(obj.blocksize),
            quant_type=obj.quant_type,
            offset=offset,
            state2=state2,
            code=getattr(obj, "code", None),
        )

"""A plain quant-state record and the duck-typed field access every oracle shares.

bnb's QuantState, tritonbits' QuantState and this class all carry the same fields; the oracles read
them through `fields_of` so that any of the three can be judged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NestedState:
    """The 8-bit blockwise state that quantizes the 4-bit absmax (bnb's `state2`)."""

    absmax: torch.Tensor  # float32, one per NESTED_BLOCKSIZE absmax values
    code: torch.Tensor  # float32[256], the dynamic code
    blocksize: int


@dataclass
class ReferenceQuantState:
    absmax: torch.Tensor  # float32 per block, or uint8 codes when nested
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor  # float32[16]
    offset: torch.Tensor | None = None  # 0-d float32, only when nested
    state2: NestedState | None = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None


def is_nested(quant_state) -> bool:
    return getattr(quant_state, "state2", None) is not None

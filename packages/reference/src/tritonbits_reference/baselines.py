"""Dequantization baselines the benchmarks race against. They share nothing with tritonbits.

- `torch_dequantize_4bit`: pure PyTorch, the same arithmetic as the oracle; given to torch.compile.
- `unsloth_fast_dequantize`: the Unsloth-style call sequence: raw bnb library calls into preallocated
  buffers (nested absmax, `+= offset`, 4-bit dequant), skipping bnb's Python dispatch. CUDA only.
- `bnb_triton_dequantize_4bit`: bnb's own Triton backend (absmax, `+= offset`, 4-bit dequant). CUDA only.
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch

from .formats import code_4bit
from .quant_state import is_nested


def torch_dequantize_4bit(A, absmax, code4, shape, dtype, blocksize, code2=None, absmax2=None,
                          blocksize2=256, offset=None):  # fmt: skip
    """Pure-PyTorch 4-bit dequantization from raw fields (no Python objects, so it compiles cleanly)."""
    n = math.prod(shape)
    packed = A.reshape(-1).view(torch.uint8)
    nibbles = torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(-1)[:n].long()
    if code2 is not None:
        scale2 = absmax2.repeat_interleave(blocksize2)[: absmax.numel()]
        absmax = code2[absmax.long()] * scale2 + offset
    # NOTE: repeat_interleave, not a [blocks, blocksize] broadcast: under torch.compile on the H200 the
    # broadcast form reached 1871 GB/s at 8192x2048 where this one reached 2870 (records of 2026-11-22).
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (code4[nibbles] * scale).to(dtype).reshape(shape)


def torch_fields(A, quant_state, device) -> dict:
    """The raw arguments `torch_dequantize_4bit` takes, read from A and any quant-state-like object."""
    fields = {
        "A": A.to(device),
        "absmax": quant_state.absmax.to(device),
        "code4": torch.from_numpy(code_4bit(quant_state.quant_type).copy()).to(device),
        "shape": tuple(quant_state.shape),
        "dtype": quant_state.dtype,
        "blocksize": int(quant_state.blocksize),
    }
    if is_nested(quant_state):
        s2 = quant_state.state2
        fields.update(code2=s2.code.to(device), absmax2=s2.absmax.to(device), blocksize2=int(s2.blocksize),
                      offset=torch.as_tensor(quant_state.offset, dtype=torch.float32, device=device))  # fmt: skip
    return fields


_buffers: dict[tuple, torch.Tensor] = {}


def _buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Unsloth keeps one global weight buffer and one absmax buffer and grows them as needed."""
    key = (dtype, device)
    buf = _buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = _buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def unsloth_fast_dequantize(W: torch.Tensor, quant_state, out: torch.Tensor | None = None) -> torch.Tensor:
    """Unsloth-style fast_dequantize: bnb's C entry points called directly into preallocated buffers."""
    from bitsandbytes.functional import lib

    device = W.device
    stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
    dtype = quant_state.dtype
    n = math.prod(quant_state.shape)
    if out is None:
        out = _buffer(n, dtype, device).view(quant_state.shape)
    absmax = quant_state.absmax
    if is_nested(quant_state):
        s2 = quant_state.state2
        out_absmax = _buffer(absmax.numel(), torch.float32, device)
        lib.cdequantize_blockwise_fp32(
            ctypes.c_void_p(s2.code.data_ptr()), ctypes.c_void_p(absmax.data_ptr()),
            ctypes.c_void_p(s2.absmax.data_ptr()), ctypes.c_void_p(out_absmax.data_ptr()),
            ctypes.c_int(s2.blocksize), ctypes.c_int(absmax.numel()), stream,
        )  # fmt: skip
        out_absmax += quant_state.offset
        absmax = out_absmax
    name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    fn = getattr(lib, f"cdequantize_blockwise_{name}_{quant_state.quant_type}")
    fn(
        None, ctypes.c_void_p(W.data_ptr()), ctypes.c_void_p(absmax.data_ptr()), ctypes.c_void_p(out.data_ptr()),
        ctypes.c_int(quant_state.blocksize), ctypes.c_int(n), stream,
    )  # fmt: skip
    return out


def bnb_triton_dequantize_4bit(A: torch.Tensor, quant_state) -> torch.Tensor:
    """bnb's Triton backend, called the way bnb.functional calls its backends."""
    from bitsandbytes.backends.triton import ops as triton_ops

    absmax = quant_state.absmax
    if is_nested(quant_state):
        s2 = quant_state.state2
        absmax = triton_ops.dequantize_blockwise(absmax, s2.absmax, s2.code, s2.blocksize, torch.float32)
        absmax += quant_state.offset
    return triton_ops.dequantize_4bit(
        A, absmax, quant_state.blocksize, quant_state.quant_type, quant_state.shape, quant_state.dtype
    )


# --- quantize baselines ---------------------------------------------------------------------------------

_NF4_THRESHOLDS = (
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
)  # fmt: skip
_FP4_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
_FP4_RANK_CODES = (0, 1, 6, 7, 4, 5, 2, 3)


def quantize_tables(quant_type: str, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(thresholds, FP4 rank -> code table or None) for `torch_quantize_4bit`, made once outside the timed
    call (a host-to-device copy inside it could not be captured in a CUDA graph)."""
    if quant_type == "nf4":
        return torch.tensor(_NF4_THRESHOLDS, dtype=torch.float32, device=device), None
    return (torch.tensor(_FP4_THRESHOLDS, dtype=torch.float32, device=device),
            torch.tensor(_FP4_RANK_CODES, dtype=torch.int64, device=device))  # fmt: skip


def torch_quantize_4bit(A: torch.Tensor, blocksize: int, thresholds: torch.Tensor,
                        rank_codes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Pure-PyTorch 4-bit quantizer (bnb CUDA's arithmetic, for torch.compile to race): (packed uint8 [n/2],
    fp32 absmax); NF4 when rank_codes is None, else FP4 (see `quantize_tables`). Needs numel % blocksize == 0
    and an even numel (benchmark shapes)."""
    x = A.reshape(-1, blocksize).float()
    absmax = torch.where(x.isnan(), -3.4028234663852886e38, x.abs()).amax(dim=1)
    scaled = x * (1.0 / absmax)[:, None]
    if rank_codes is None:
        codes = (scaled[..., None] > thresholds).sum(-1)
    else:
        rank = (scaled.abs()[..., None] > thresholds).sum(-1)
        codes = rank_codes[rank] | torch.where(scaled < 0, 8, 0)
    codes = codes.reshape(-1, 2).to(torch.uint8)
    return (codes[:, 0] << 4) | codes[:, 1], absmax


def bnb_triton_quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str, nested: bool):
    """bnb's Triton backend quantize, with bnb.functional's nested sequence around it."""
    from bitsandbytes.backends.triton import ops as triton_ops

    packed, absmax = triton_ops.quantize_4bit(A, blocksize, quant_type, torch.uint8)
    if nested:
        offset = absmax.mean()
        code = _dynamic_code(A.device)
        qabsmax, absmax2 = triton_ops.quantize_blockwise(absmax - offset, code, 256)
        return packed, qabsmax, absmax2, offset
    return packed, absmax


def bnb_triton_quantize_blockwise(A: torch.Tensor, blocksize: int):
    from bitsandbytes.backends.triton import ops as triton_ops

    return triton_ops.quantize_blockwise(A, _dynamic_code(A.device), blocksize)


@functools.cache
def _dynamic_code(device) -> torch.Tensor:
    from .formats import dynamic_code

    return torch.from_numpy(dynamic_code()).to(device)

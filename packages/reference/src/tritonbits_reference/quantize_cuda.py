"""numpy oracle of bitsandbytes' CUDA quantizers (kQuantizeBlockwise with dQuantizeNF4 / dQuantizeFP4 /
dQuantize, kDequantizeBlockwise for 8-bit), written from bnb's algorithm (docs/format.md, "Quantize").

- absmax per block: fmaxf over |x| starting from -FLT_MAX (fmaxf drops NaN, so an all-NaN block stays at
  -FLT_MAX); a tail block also sees the zero padding its load fills in.
- fast math (--use_fast_math): fabsf/fmaxf and the multiplies flush subnormal operands and results to a zero of
  the same sign (`formats.mul_ftz`): an absmax below 2**-126 is stored as 0, a subnormal x scales to +-0, and so
  does a product x * r below 2**-126 (r = 1 / absmax itself flushes to 0 for absmax above 2**126).
- scaled = fl(x * fl(1 / absmax)) in float32, with that flush.
- 4-bit: bnb's decision trees, literally (nested comparisons against its decimal literals in float32).
- 8-bit: bnb's 7-step binary search from pivot 127 and its fp32 midpoint rule.
- nested: offset = absmax.mean() (torch float32, as bnb); quantize_blockwise(absmax - offset, 256).
"""

from __future__ import annotations

import numpy as np
import torch

from .formats import FLT_MIN, code_4bit, dynamic_code, mul_ftz
from .quant_state import NestedState, ReferenceQuantState

F32 = np.float32
FLT_MAX = np.finfo(np.float32).max


def _absmax(x: np.ndarray, blocksize: int) -> np.ndarray:
    blocks = -(-x.size // blocksize)
    padded = np.zeros(blocks * blocksize, dtype=np.float32)
    padded[: x.size] = np.abs(x)
    padded[: x.size][np.isnan(x)] = -FLT_MAX
    absmax = np.maximum(padded.reshape(blocks, blocksize).max(axis=1, initial=-FLT_MAX), -FLT_MAX).astype(F32)
    # fabsf/fmaxf flush subnormals (fast math): a block whose absmax is below 2**-126 has absmax 0
    return np.where((absmax > 0) & (absmax < FLT_MIN), F32(0.0), absmax).astype(F32)


def _reciprocal(absmax: np.ndarray) -> np.ndarray:
    """1 / absmax in float32, correctly rounded (bnb's rcp.approx.ftz differs in the last bit for some absmax:
    see tritonbits' ops/blockwise_8bit.py); absmax 0 gives inf, and with it 0 * inf = NaN: code 0."""
    with np.errstate(divide="ignore"):
        return (F32(1.0) / absmax).astype(F32)


def _scaled(x: np.ndarray, absmax: np.ndarray, blocksize: int) -> np.ndarray:
    return mul_ftz(x, _reciprocal(absmax)[np.arange(x.size) // blocksize])


def _tree(x, t, above, below):
    return np.where(x > F32(t), above, below)


def nf4_tree(x: np.ndarray) -> np.ndarray:
    """bnb's dQuantizeNF4, one comparison at a time (NaN: every comparison false)."""
    return _tree(x, 0.03979014977812767,
                 _tree(x, 0.3893125355243683,
                       _tree(x, 0.6427869200706482, _tree(x, 0.8614784181118011, 0b1111, 0b1110),
                             _tree(x, 0.5016634166240692, 0b1101, 0b1100)),
                       _tree(x, 0.2035212516784668, _tree(x, 0.2920137718319893, 0b1011, 0b1010),
                             _tree(x, 0.1202552504837513, 0b1001, 0b1000))),
                 _tree(x, -0.33967943489551544,
                       _tree(x, -0.13791173323988914, _tree(x, -0.045525018125772476, 0b0111, 0b0110),
                             _tree(x, -0.23460740596055984, 0b0101, 0b0100)),
                       _tree(x, -0.6106329262256622, _tree(x, -0.4599952697753906, 0b0011, 0b0010),
                             _tree(x, -0.8480964004993439, 0b0001, 0b0000))))  # fmt: skip


def fp4_tree(x: np.ndarray) -> np.ndarray:
    """bnb's dQuantizeFP4: sign bit when x < 0, then a tree on |x|."""
    sign = np.where(x < 0, 0b1000, 0)
    a = np.abs(x)
    magnitude = _tree(a, 0.29166667,
                      _tree(a, 0.583333, _tree(a, 0.8333333, 0b0011, 0b0010), _tree(a, 0.4166667, 0b101, 0b100)),
                      _tree(a, 0.0859375, _tree(a, 0.20833333, 0b0111, 0b0110),
                            _tree(a, 0.00260417, 0b0001, 0b0000)))  # fmt: skip
    return magnitude + sign


def dquantize(code: np.ndarray, x: np.ndarray) -> np.ndarray:
    """bnb's dQuantize<0> (8-bit): binary search, then the nearer neighbour by fp32 midpoints."""
    code = code.astype(F32)
    pivot = np.full(x.shape, 127)
    upper_pivot = np.full(x.shape, 255)
    lower_pivot = np.zeros(x.shape, dtype=np.int64)
    lower = np.full(x.shape, F32(-1.0))
    upper = np.full(x.shape, F32(1.0))
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        up = x > val
        lower_pivot = np.where(up, pivot, lower_pivot)
        lower = np.where(up, val, lower)
        upper_pivot = np.where(up, upper_pivot, pivot)
        upper = np.where(up, upper, val)
        pivot = np.where(up, pivot + step, pivot - step)
        val = code[pivot]
    upper = np.where(upper_pivot == 255, code[255], upper)
    lower = np.where(lower_pivot == 0, code[0], lower)
    mid_up = ((upper + val).astype(F32) * F32(0.5)).astype(F32)
    mid_down = ((lower + val).astype(F32) * F32(0.5)).astype(F32)
    result = np.where(x > val, np.where(x > mid_up, upper_pivot, pivot), np.where(x < mid_down, lower_pivot, pivot))
    return result.astype(np.uint8)


def _flat32(A: torch.Tensor) -> np.ndarray:
    return A.detach().reshape(-1).float().cpu().numpy()


def quantize_blockwise_cuda(
    A: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = 4096, nested: bool = False
) -> tuple[torch.Tensor, dict]:
    """Oracle of bnb CUDA quantize_blockwise: (uint8 codes shaped like A, {absmax, code, blocksize[, offset,
    state2 absmax/code]})."""
    code_np = dynamic_code() if code is None else code.cpu().numpy().astype(F32)
    x = _flat32(A)
    absmax = _absmax(x, blocksize)
    q = dquantize(code_np, _scaled(x, absmax, blocksize))
    state = {"absmax": torch.from_numpy(absmax), "code": torch.from_numpy(code_np.copy()), "blocksize": blocksize}
    if nested:
        offset = torch.from_numpy(absmax).mean()
        q2, absmax2 = _blockwise(absmax - offset.numpy(), blocksize)
        state.update(absmax=torch.from_numpy(q2), offset=offset, absmax2=torch.from_numpy(absmax2),
                     code2=torch.from_numpy(dynamic_code()))  # fmt: skip
    return torch.from_numpy(q).reshape(A.shape), state


def _blockwise(x: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(F32)
    absmax = _absmax(x, blocksize)
    return dquantize(dynamic_code(), _scaled(x, absmax, blocksize)), absmax


def dequantize_blockwise_cuda(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """Oracle of bnb CUDA kDequantizeBlockwise (8-bit): code[q] * absmax in fp32 (mul.ftz: a product below 2**-126
    is a signed 0), one rounding to dtype."""
    qn = q.reshape(-1).cpu().numpy().astype(np.int64)
    a = absmax.cpu().numpy().astype(F32)
    values = mul_ftz(code.cpu().numpy().astype(F32)[qn], a[np.arange(qn.size) // blocksize])
    return torch.from_numpy(values).to(dtype).reshape(q.shape)


def quantize_4bit_cuda(
    A: torch.Tensor,
    blocksize: int = 64,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
) -> tuple[torch.Tensor, ReferenceQuantState]:
    """Oracle of bnb CUDA quantize_4bit: (packed uint8 [(n + 1) // 2, 1], state)."""
    x = _flat32(A)
    # an absmax below 2**-126 is stored as 0 (_absmax), and its block's values (flushed to 0) times 1/0 are all
    # NaN, as an all-zero block's are: code 0
    absmax = _absmax(x, blocksize)
    scaled = _scaled(x, absmax, blocksize)
    if scaled.size % 2:  # the load pads with 0; the pad is scaled by the last block's reciprocal
        scaled = np.append(scaled, mul_ftz(F32(0.0), _reciprocal(absmax[-1:])))
    codes = (nf4_tree if quant_type == "nf4" else fp4_tree)(scaled).astype(np.uint8)
    packed = torch.from_numpy(((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)).unsqueeze(1)
    state = ReferenceQuantState(absmax=torch.from_numpy(absmax), shape=A.shape, dtype=A.dtype, blocksize=blocksize,
                                quant_type=quant_type, code=torch.from_numpy(code_4bit(quant_type).copy()))  # fmt: skip
    if compress_statistics:
        offset = torch.from_numpy(absmax).mean()
        q2, absmax2 = _blockwise((absmax - offset.numpy()).astype(F32), 256)
        state.absmax = torch.from_numpy(q2)
        state.offset = offset
        state.state2 = NestedState(absmax=torch.from_numpy(absmax2), code=torch.from_numpy(dynamic_code()),
                                   blocksize=256)  # fmt: skip
    return packed, state

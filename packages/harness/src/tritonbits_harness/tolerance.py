"""Tolerance policy: one table per (kernel, dtype, backend), and the comparisons tests call.

- dequantize_4bit: exact everywhere (bnb on CUDA, the numpy oracle under the interpreter): torch.equal.
- dequant_bias: the kernel computes in fp32 (up to 4 roundings: int32->fp32, two products, the bias sum)
  and rounds once to the output dtype. Against the float64 value v of acc*sa*sb+bias it must hold that
      |out - v| <= ulps * ulp_out(v) + fp32_terms * 2**-24 * (|acc*sa*sb| + |bias|)
  with ulps = 0.5 (one correct rounding) plus the fp32 error, which can push a value across a rounding
  boundary: the only case where the result is 1 ulp away from the correctly rounded one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tritonbits_reference import dequant_bias_exact


@dataclass(frozen=True)
class Tolerance:
    exact: bool
    ulps: float = 0.0  # of the output dtype, at the exact value
    fp32_terms: int = 0  # fp32 roundings before the final one


EXACT = Tolerance(exact=True)
EPILOGUE = Tolerance(exact=False, ulps=0.5, fp32_terms=4)

_POLICY: dict[tuple[str, torch.dtype, str], Tolerance] = {}
for _backend in ("cuda", "interpreter"):
    for _dtype in (torch.float16, torch.bfloat16, torch.float32):
        _POLICY["dequantize_4bit", _dtype, _backend] = EXACT
        _POLICY["dequant_bias", _dtype, _backend] = EPILOGUE


def policy(kernel: str, dtype: torch.dtype, backend: str) -> Tolerance:
    try:
        return _POLICY[kernel, dtype, backend]
    except KeyError:
        raise KeyError(f"no tolerance policy for kernel={kernel!r} dtype={dtype} backend={backend!r}") from None


def backend_of(t: torch.Tensor) -> str:
    return "cuda" if t.device.type == "cuda" else "interpreter"


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |x| (float64), subnormals included."""
    info = torch.finfo(dtype)
    x = x.abs().to(torch.float64).clamp_min(info.tiny)
    exponent = torch.floor(torch.log2(x))
    return torch.pow(2.0, exponent) * info.eps


def _describe(mask: torch.Tensor, actual: torch.Tensor, expected: torch.Tensor, limit: int = 5) -> str:
    idx = mask.nonzero()[:limit]
    rows = [f"  at {tuple(i.tolist())}: got {actual[tuple(i)].item()!r}, want {expected[tuple(i)].item()!r}"
            for i in idx]  # fmt: skip
    return f"{int(mask.sum())} of {mask.numel()} elements differ; first:\n" + "\n".join(rows)


def assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """torch.equal, with the first mismatching indices when it fails."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    if torch.equal(actual, expected):
        return
    a, e = actual.cpu(), expected.cpu()
    differ = ~((a == e) | (a.isnan() & e.isnan()))
    raise AssertionError(_describe(differ, a, e))


def assert_within(kernel: str, actual: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor) -> None:
    """Check `actual` against the float64 `exact` value under the kernel's policy.

    magnitude: float64 |acc*sa*sb| + |bias|, the scale of the fp32 rounding errors."""
    tol = policy(kernel, actual.dtype, backend_of(actual))
    if tol.exact:
        assert_exact(actual, exact.to(actual.dtype))
        return
    a = actual.detach().cpu().to(torch.float64)
    e = exact.detach().cpu().to(torch.float64)
    bound = tol.ulps * ulp(e, actual.dtype) + tol.fp32_terms * 2.0**-24 * magnitude.cpu().to(torch.float64)
    bad = ~((a - e).abs() <= bound)
    if bad.any():
        raise AssertionError(f"{kernel} ({actual.dtype}) outside its policy {tol}: " + _describe(bad, a, e))


def assert_dequant_bias(out: torch.Tensor, acc, scale_a, scale_b, bias=None) -> None:
    """Judge a dequant_bias result against the float64 oracle under the epilogue policy."""
    acc, scale_a, scale_b = acc.cpu(), scale_a.cpu(), scale_b.cpu()
    exact = dequant_bias_exact(acc, scale_a, scale_b, None)
    magnitude = exact.abs()
    if bias is not None:
        exact = dequant_bias_exact(acc, scale_a, scale_b, bias.cpu())
        magnitude = magnitude + bias.cpu().double().abs().reshape(1, -1)
    assert_within("dequant_bias", out, exact, magnitude)


# --- quantize round trip ----------------------------------------------------------------------------

# The largest gap between neighbouring values of each 4-bit code, in units of the block's absmax.
_CODE_GAP = {"nf4": -0.6961928009986877 - -1.0, "fp4": (12.0 - 8.0) / 12.0}  # NF4: between -1 and its neighbour
# bnb's thresholds are decimal literals, a few fp32 ulps off the exact midpoints (FP4: 0.583333 for 7/12),
# and the scaled value x * fl(1/absmax) carries two fp32 roundings: this much past the half gap is allowed.
_THRESHOLD_SLACK = 2.0**-20


def quantize_round_trip_bound(quant_type: str, block_absmax, used_absmax, values: torch.Tensor) -> torch.Tensor:
    """Policy for dequantize(quantize(x)) against x, per element (float64):
      half the code's largest gap (+ threshold slack) * the block's true absmax
    + |absmax the dequantizer used - true absmax|   (nested: the 8-bit absmax error; codes are in [-1, 1])
    + half an ulp of the output dtype at the dequantized value (its final rounding)."""
    import numpy as np

    per_block = (0.5 * _CODE_GAP[quant_type] + _THRESHOLD_SLACK) * np.asarray(block_absmax) + np.abs(
        np.asarray(used_absmax) - np.asarray(block_absmax)
    )
    return torch.from_numpy(per_block), 0.5 * ulp(values, values.dtype)


def assert_quantize_round_trip(got: torch.Tensor, x: torch.Tensor, quant_type: str, blocksize: int,
                               block_absmax, used_absmax) -> None:  # fmt: skip
    """|got - x| within `quantize_round_trip_bound` for every element."""
    per_block, rounding = quantize_round_trip_bound(quant_type, block_absmax, used_absmax, got.cpu())
    n = x.numel()
    bound = per_block.repeat_interleave(blocksize)[:n] + rounding.reshape(-1)
    err = (got.cpu().double().reshape(-1) - x.cpu().double().reshape(-1)).abs()
    bad = ~(err <= bound)
    if bad.any():
        g, e = got.cpu().double().reshape(-1), x.cpu().double().reshape(-1)
        raise AssertionError(f"quantize round trip ({quant_type}, blocksize {blocksize}) outside its bound: "
                             + _describe(bad, g, e))  # fmt: skip

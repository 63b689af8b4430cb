"""Tolerance policy: one table per (kernel, dtype, backend), and the comparisons tests call.

- dequantize_4bit: exact everywhere (bnb on CUDA, the numpy oracle under the interpreter): torch.equal.
- dequant_bias: the kernel computes in fp32 (up to 4 roundings: int32->fp32, two products, the bias sum)
  and rounds once to the output dtype. Against the float64 value v of acc*sa*sb+bias it must hold that
      |out - v| <= ulps * ulp_out(v) + fp32_terms * 2**-24 * (|acc*sa*sb| + |bias|)
  with ulps = 0.5 (one correct rounding) plus the fp32 error, which can push a value across a rounding
  boundary: the only case where the result is 1 ulp away from the correctly rounded one.
- linear_4bit (and any matmul accumulating in fp32): K-aware, see `matmul_bound` / `assert_matmul`.
- quantize_4bit: a code may be the oracle's or, at a tie, its neighbour in value order (`assert_codes`);
  the round trip obeys `quantize_error_bound` (see `assert_quantize_roundtrip`).

Every tolerance literal lives in this module; tests ask for the policy, never write their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tritonbits_reference import dequant_bias_exact

U32 = 2.0**-24  # fp32 unit roundoff (round to nearest)


@dataclass(frozen=True)
class Tolerance:
    exact: bool
    ulps: float = 0.0  # of the output dtype, at the exact value (matmuls: at the result)
    fp32_terms: int = 0  # fp32 roundings before the final one (beyond the K of a matmul)
    k_factor: float = 0.0  # matmuls: c in c * (K + fp32_terms) * 2**-24 * (|x| @ |W|.T + |bias|)
    code_steps: int = 0  # quantize: how many steps (in code-value order) a code may be from the oracle's
    tie_slack: float = 0.0  # quantize: how close x/absmax must be to a decision boundary for a neighbour


EXACT = Tolerance(exact=True)
EPILOGUE = Tolerance(exact=False, ulps=0.5, fp32_terms=4)
# c = 2: a tensor-core adder may truncate instead of rounding to nearest (unit roundoff 2**-23, not 2**-24)
MATMUL_FP32_ACC = Tolerance(exact=False, ulps=0.5, fp32_terms=2, k_factor=2.0)
# the kernel and the oracle may compute x/absmax differently (a reciprocal, a division, fused multiply-add):
# a few fp32 roundings, so a value within 4 fp32 ulps of 1.0 (the largest |x/absmax|) of a decision
# boundary may land on either side
QUANTIZE_NEIGHBOUR = Tolerance(exact=False, code_steps=1, tie_slack=4 * 2.0**-23)

_POLICY: dict[tuple[str, torch.dtype, str], Tolerance] = {}
for _backend in ("cuda", "interpreter"):
    for _dtype in (torch.float16, torch.bfloat16, torch.float32):
        _POLICY["dequantize_4bit", _dtype, _backend] = EXACT
        _POLICY["dequant_bias", _dtype, _backend] = EPILOGUE
        _POLICY["linear_4bit", _dtype, _backend] = MATMUL_FP32_ACC
        # NOTE: fp16/bf16 input: byte-equal with bnb CUDA (0 differing bytes of 29.4M per format and dtype,
        # 14336x4096, H100, docs/gpu-runs/logs/20261123T0202Z-nvidia-h100-quantize-rcp-probe.txt). fp32 input:
        # 5 of 29.4M NF4 bytes differed, each at a scaled value within one fp32 ulp of a threshold (bnb's
        # fast-math reciprocal and Triton's round some absmax apart): a neighbouring code at a near tie.
        exact_input = _dtype != torch.float32
        _POLICY["quantize_4bit", _dtype, _backend] = EXACT if exact_input else QUANTIZE_NEIGHBOUR


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
    """torch.equal (so +0.0 equals -0.0), NaN equal to NaN at the same index; the first mismatching indices
    when it fails."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    if torch.equal(actual, expected):
        return
    a, e = actual.cpu(), expected.cpu()
    differ = ~((a == e) | (a.isnan() & e.isnan()))
    if not differ.any():  # NaN in the same places (torch.equal never takes NaN as equal)
        return
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


# --- matmuls with fp32 accumulation (linear_4bit) ----------------------------------------------------------


def matmul_bound(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                 tol: Tolerance = MATMUL_FP32_ACC) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(reference, bound) for out = x @ w.T (+ bias) computed in fp32 and rounded once to out.dtype.

    x: [..., K], w: [N, K] (the dequantized weight, exactly what the kernel multiplies), bias: [N].
    - reference: x @ w.T + bias in float64 (exact for K up to 2**29 with fp16/bf16 operands, and within
      a relative 2**-53 * K otherwise, negligible here);
    - operand-magnitude product: |x| @ |w|.T + |bias| in float64;
    - bound: |out - reference| <= c * (K + fp32_terms) * 2**-24 * magnitude + ulps * ulp_out(out).
    The first term is the classical dot-product error gamma_K * sum |x_k w_k| for any summation order
    (fp16/bf16 products are exact in fp32; fp32_terms covers the bias add and one scaling); c = k_factor
    allows a truncating accumulator. The second is the final rounding to out.dtype: 0.5 ulp at the
    rounded result (never smaller than the ulp at the fp32 value it came from). TF32 does not pass it.
    """
    if x.shape[-1] != w.shape[-1] or w.dim() != 2:
        raise ValueError(f"x {tuple(x.shape)} and w {tuple(w.shape)}: w must be [N, K] with x's last dim K")
    k = x.shape[-1]
    xd, wd = x.detach().cpu().double(), w.detach().cpu().double()
    ref = xd @ wd.T
    magnitude = xd.abs() @ wd.abs().T
    if bias is not None:
        if bias.shape != (w.shape[0],):
            raise ValueError(f"bias must be [N] = [{w.shape[0]}], got {tuple(bias.shape)}")
        bd = bias.detach().cpu().double()
        ref, magnitude = ref + bd, magnitude + bd.abs()
    if out.shape != ref.shape:
        raise ValueError(f"out {tuple(out.shape)} is not x @ w.T {tuple(ref.shape)}")
    bound = tol.k_factor * (k + tol.fp32_terms) * U32 * magnitude + tol.ulps * ulp(out.detach().cpu(), out.dtype)
    return ref, bound


def assert_matmul(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                  kernel: str = "linear_4bit") -> None:  # fmt: skip
    """Judge out = x @ w.T (+ bias) against the float64 reference under `kernel`'s K-aware policy."""
    tol = policy(kernel, out.dtype, backend_of(out))
    if tol.k_factor <= 0:
        raise ValueError(f"policy of {kernel!r} ({tol}) is not a matmul policy")
    ref, bound = matmul_bound(out, x, w, bias, tol)
    a = out.detach().cpu().double()
    bad = ~((a - ref).abs() <= bound)
    if bad.any():
        raise AssertionError(f"{kernel} ({out.dtype}) outside its K-aware policy {tol}: " + _describe(bad, a, ref))


# --- quantize: codes and the round-trip error ------------------------------------------------------------


def _value_rank(code_values: torch.Tensor) -> torch.Tensor:
    """Per code index, the position of its value among the distinct sorted values (0.0 == -0.0)."""
    values = torch.as_tensor(code_values, dtype=torch.float64).flatten()
    distinct = torch.unique(values)  # sorted
    return torch.searchsorted(distinct, values)


def max_code_gap(code_values) -> float:
    """The largest gap between neighbouring code values over [-1, 1]; an end of the range not reached by a
    code counts twice (nothing rounds to it from the far side)."""
    values = torch.unique(torch.as_tensor(code_values, dtype=torch.float64).flatten())
    if values.numel() < 2 or values.min() < -1 or values.max() > 1:
        raise ValueError(f"code_values must hold at least 2 values in [-1, 1], got {values.tolist()}")
    gaps = [*(values[1:] - values[:-1]).tolist(), 2 * float(values[0] + 1), 2 * float(1 - values[-1])]
    return max(gaps)


def assert_codes(got: torch.Tensor, want: torch.Tensor, code_values, scaled: torch.Tensor | None = None,
                 kernel: str = "quantize_4bit") -> None:  # fmt: skip
    """Every quantized code (unpacked indices into code_values) is the oracle's, or, where `kernel`'s
    policy allows it, a neighbour in code-value order (`code_steps`). With `scaled` (x / absmax in float64,
    the value the codes round) a neighbour is accepted only within `tie_slack` of the decision boundary
    between the two code values: a near tie, never a plain wrong choice."""
    if got.shape != want.shape:
        raise ValueError(f"got {tuple(got.shape)} and want {tuple(want.shape)} differ in shape")
    tol = policy(kernel, torch.float32, backend_of(got))
    g, w = got.detach().cpu().long(), want.detach().cpu().long()
    if g.min() < 0 or g.max() >= len(code_values):
        raise ValueError(f"got holds codes outside 0..{len(code_values) - 1}")
    rank = _value_rank(code_values)
    steps = (rank[g] - rank[w]).abs()
    bad = steps > (0 if tol.exact else tol.code_steps)
    if scaled is not None and not tol.exact:
        values = torch.as_tensor(code_values, dtype=torch.float64).flatten()
        boundary = (values[g] + values[w]) / 2
        off_tie = (scaled.detach().cpu().double().reshape(g.shape) - boundary).abs() > tol.tie_slack
        bad |= (steps > 0) & off_tie
    if bad.any():
        raise AssertionError(f"{kernel} codes outside its policy {tol}: " + _describe(bad, g, w))


def assert_packed_4bit(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, absmax: torch.Tensor,
                       blocksize: int, code_values, kernel: str = "quantize_4bit") -> None:  # fmt: skip
    """Packed 4-bit bytes (high nibble = element 2j) against the oracle's under `kernel`'s policy for x's dtype:
    equal, or (where the policy allows) differing only by neighbouring codes at near ties of x / absmax.
    absmax: the fp32 per-block absmax both sides used (equal; checked apart)."""
    tol = policy(kernel, x.dtype, backend_of(got))
    if tol.exact:
        assert_exact(got, want.to(got.device))
        return
    g, w = got.reshape(-1), want.to(got.device).reshape(-1)
    if g.shape != w.shape:
        raise AssertionError(f"packed shapes {tuple(got.shape)} and {tuple(want.shape)} differ")
    diff = (g != w).nonzero().flatten()
    if diff.numel() == 0:
        return
    n = x.numel()
    idx = torch.stack([2 * diff, 2 * diff + 1], 1).reshape(-1)
    keep = idx < n  # an odd count's padding nibble has no element
    unpack = lambda b: torch.stack([b >> 4, b & 15], 1).reshape(-1).long()
    codes_g, codes_w, idx = unpack(g[diff])[keep], unpack(w[diff])[keep], idx[keep]
    scaled = x.reshape(-1)[idx].double() / absmax.reshape(-1)[idx // blocksize].double()
    assert_codes(codes_g.cpu(), codes_w.cpu(), code_values, scaled.cpu(), kernel)


def quantize_error_bound(x: torch.Tensor, code_values, blocksize: int, nested_error: float | torch.Tensor = 0.0,
                         kernel: str = "quantize_4bit") -> torch.Tensor:  # fmt: skip
    """Per element of x, the largest |dequant(quant(x)) - x| that blockwise absmax quantization may leave:

        0.5 * max_gap(code) * absmax_block + tie_slack * absmax_block + nested_error

    absmax_block: max |x| of the element's block of `blocksize` (flattened x, last block partial);
    max_gap: `max_code_gap` (rounding to the nearest code value moves x/absmax by at most half of it;
    tie_slack: a neighbour chosen at a near tie moves it by at most tie_slack more); nested_error: a bound
    on |stored absmax - absmax| (scalar or per block) when the absmax itself is quantized (|code| <= 1).
    The dequantized value's own rounding to its dtype is not included: add it when comparing."""
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    tol = policy(kernel, torch.float32, backend_of(x))
    flat = x.detach().cpu().double().flatten()
    blocks = -(-flat.numel() // blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=torch.float64)
    padded[: flat.numel()] = flat.abs()
    absmax = padded.reshape(blocks, blocksize).amax(dim=1)
    nested = torch.as_tensor(nested_error, dtype=torch.float64)
    if nested.dim() == 1 and nested.numel() != blocks:
        raise ValueError(f"nested_error has {nested.numel()} entries for {blocks} blocks")
    per_block = (0.5 * max_code_gap(code_values) + tol.tie_slack) * absmax + nested
    return per_block.repeat_interleave(blocksize)[: flat.numel()].reshape(x.shape)


def assert_quantize_roundtrip(
    dequantized: torch.Tensor,
    x: torch.Tensor,
    code_values,
    blocksize: int,
    nested_error: float | torch.Tensor = 0.0,
    kernel: str = "quantize_4bit",
) -> None:
    """|dequantized - x| <= quantize_error_bound + 0.5 ulp of dequantized's dtype (its final rounding)."""
    if dequantized.shape != x.shape:
        raise ValueError(f"dequantized {tuple(dequantized.shape)} and x {tuple(x.shape)} differ in shape")
    bound = quantize_error_bound(x, code_values, blocksize, nested_error, kernel)
    d = dequantized.detach().cpu()
    bound = bound + 0.5 * ulp(d, d.dtype)
    e = x.detach().cpu().double()
    bad = ~((d.double() - e).abs() <= bound)
    if bad.any():
        raise AssertionError(f"{kernel} round trip outside its bound: " + _describe(bad, d.double(), e))

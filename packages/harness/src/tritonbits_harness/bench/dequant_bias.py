"""Benchmarks of tritonbits.dequant_bias against the seed's eager versions and torch.compile."""

from __future__ import annotations

import functools

import torch

import tritonbits
from tritonbits_reference.dequant_bias import dequant_bias_eager, dequant_bias_expression

from .. import patterns
from .registry import Benchmark, register

NS = (2560, 3840, 13824, 4096, 14336)  # BitNet b1.58 2B layers, then Llama-3-8B
MS = (1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
ACC = {"int32": torch.int32, "bf16": torch.bfloat16, "fp32": torch.float32}
OUT = torch.bfloat16


def bytes_model(case: dict) -> int:
    """acc read + bf16 out written + fp32 scales + bf16 bias."""
    m, n = case["m"], case["n"]
    return m * n * (ACC[case["acc"]].itemsize + OUT.itemsize) + 4 * m + 4 * n + 2 * n


def cases(cpu: bool) -> list[dict]:
    if cpu:
        return [{"m": m, "n": n, "acc": a} for m, n in ((1, 64), (16, 96)) for a in ACC]
    return [{"m": m, "n": n, "acc": a} for a in ACC for n in NS for m in MS]


@functools.cache
def _compiled():
    return torch.compile(dequant_bias_expression)


def operands(case: dict, device: torch.device):
    m, n, dtype = case["m"], case["n"], ACC[case["acc"]]
    if dtype == torch.int32:
        acc = torch.randint(-(2**20), 2**20, (m, n), dtype=dtype, device=device)
    else:
        acc = torch.randn(m, n, device=device).to(dtype)
    sa = torch.rand(m, 1, device=device) + 0.5
    sb = torch.rand(1, n, device=device) + 0.5
    bias = torch.randn(n, device=device).to(OUT)
    return acc, sa, sb, bias


def setup(case: dict, device: torch.device) -> dict:
    acc, sa, sb, bias = operands(case, device)
    pattern_out = torch.empty(acc.shape, dtype=OUT, device=device)
    thunks = {
        "tritonbits": lambda: tritonbits.dequant_bias(acc, sa, sb, bias, out_dtype=OUT),
        "pattern": lambda: patterns.cast_copy(acc, pattern_out),
        "eager-5op": lambda: dequant_bias_eager(acc, sa, sb, bias, out_dtype=OUT),
        "eager-expr": lambda: dequant_bias_expression(acc, sa, sb, bias, out_dtype=OUT),
    }
    if device.type == "cuda":
        compiled = _compiled()
        thunks["torch.compile"] = lambda: compiled(acc, sa, sb, bias, out_dtype=OUT)
    return thunks


register(Benchmark(
    name="dequant_bias",
    kernel="dequant_bias",
    description="out[M,N] bf16 = acc * scale_a[M,1] * scale_b[1,N] + bias[N] (bf16)",
    cases=cases,
    bytes_model=bytes_model,
    setup=setup,
    baselines=("torch.compile", "eager-5op", "eager-expr"),
))  # fmt: skip

"""Calls for Nsight Compute (GPU machine): `ncu -k regex:NAME -s 2 -c 1 ... python ci/ncu_targets.py CASE` profiles
the third launch of a kernel of one case (the first two compile and warm up).

Cases: gemv2 (linear_4bit M=1, 4096 -> 14336, bf16, nf4 nested bs64), gemm4 / gemm16 (the same at M=4 / 16:
the tensor-core gemm), q4nf4 / q4fp4 (quantize_4bit plain, bf16
14336x4096), dq8bf16 (dequantize_blockwise, bf16 out, 2**26), q8bf16 (quantize_blockwise, bf16, 2**26).
"""

from __future__ import annotations

import sys

import torch

import tritonbits


def main(case: str) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    if case in ("gemv2", "gemm4", "gemm16"):
        w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
        packed, qs = tritonbits.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        m = {"gemv2": 1, "gemm4": 4, "gemm16": 16}[case]
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
        fn = lambda: tritonbits.linear_4bit(x, packed, qs)
    elif case in ("q4nf4", "q4fp4"):
        x = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
        fn = lambda: tritonbits.quantize_4bit(x, blocksize=64, quant_type=case[2:])
    elif case in ("dq8bf16", "q8bf16"):
        x = torch.randn(1 << 26, device="cuda", dtype=torch.bfloat16, generator=g)
        q, st = tritonbits.quantize_blockwise(x)
        fn = (
            (lambda: tritonbits.dequantize_blockwise(q, st))
            if case == "dq8bf16"
            else (lambda: tritonbits.quantize_blockwise(x))
        )
    else:
        raise SystemExit(f"unknown case {case!r}")
    for _ in range(4):
        fn()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1])

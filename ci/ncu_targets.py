"""Calls for Nsight Compute (GPU machine): `ncu -k regex:NAME -s 2 -c 1 ... python ci/ncu_targets.py CASE` profiles
the third launch of a kernel of one case (the first two compile and warm up).

Cases: mma1 / mma4 (linear_4bit M=1 / 4, 4096 -> 14336, bf16, nf4 nested bs64: the mma kernel), gemv2 (M=1 with
the heuristic's pre-mma config forced: gemv2), gemm16 (M=16: the tensor-core gemm), wgmma128 / wgmma256 (M=128 / 256
through the op: on an sm90 GPU the table's wgmma kernel), q4nf4 / q4fp4 (quantize_4bit
plain, bf16 14336x4096), dq8bf16 (dequantize_blockwise, bf16 out, 2**26), q8bf16 (quantize_blockwise, bf16, 2**26).
"""

from __future__ import annotations

import sys

import torch

import tritonbits


def main(case: str) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    if case in ("mma1", "mma4", "gemv2", "gemm16", "wgmma128", "wgmma256"):
        from tritonbits.ops import linear_4bit as L
        from tritonbits.quant_state import prepare

        w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
        packed, qs = tritonbits.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        m = {"mma1": 1, "mma4": 4, "gemv2": 1, "gemm16": 16, "wgmma128": 128, "wgmma256": 256}[case]
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
        if case == "gemv2":
            pw, sms = prepare(packed, qs), torch.cuda.get_device_properties(0).multi_processor_count
            cfg = L.heuristic_config(x.dtype, 1, 14336, 4096, sms, mma=False)
            fn = lambda: L.forward_2d(x, pw, None, config=cfg)
        else:
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

"""Timing-only variants of gemv3's PTX (wrong results by design): where does its time go? (H100 log
docs/gpu-runs/logs/20261124T0552Z-nvidia-h100-gemv3-variants.txt)

    python ci/linear4bit_gemv3_variants.py

lut: the kernel; noshfl: each lookup shuffle replaced by an integer add (same instruction count, no shuffle);
noabs: also the absmax shuffle; stream: no decode (the unit summed as an integer: the loads, the absmax chain and
the split-K reduction only).
"""

import re
from functools import partial

import torch

import tritonbits
from tritonbits.ops import linear_4bit as L
from tritonbits.ops import linear_4bit_gemv3 as G
from tritonbits.quant_state import prepare
from tritonbits_harness import timing

real = G.unit_asm


def variant(name):
    def f(w_dtype, nib):
        s = real(w_dtype, nib)
        if name in ("noshfl", "noabs"):
            s = re.sub(r"shfl\.sync\.idx\.b32 w, t, (\S+), 0x100f, -1;", r"add.u32 w, t, \1;", s)
        if name == "noabs":
            s = s.replace("shfl.sync.idx.b32 t, $2, $3, 0x100f, -1;", "add.u32 t, $2, $3;")
        if name == "stream":
            s = (
                "{ .reg .b32 t; add.u32 t, $1, $2; add.u32 t, t, $3; add.u32 t, t, $4; add.u32 t, t, $5; "
                "cvt.rn.f32.u32 $0, t; }"
            )
        return s

    return f


gen = torch.Generator(device="cuda").manual_seed(0)
for k, n in ((4096, 14336), (8192, 28672)):
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    packed, qs = tritonbits.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    pw = prepare(packed, qs)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    t2 = (
        timing.bench_graph(
            partial(L.forward_2d, x, pw, None, config=L.heuristic_gemv2_config(x.dtype, 1, n, k)), rep=20
        )
        * 1e3
    )
    print(f"K={k} N={n} gemv2 {t2:.2f} us", flush=True)
    for c in ("8x4x1x8", "16x4x1x4", "16x8x1x8", "8x2x1x8"):
        nblk, warps, rpt, per_sm = (int(v) for v in c.split("x"))
        cfg = {"path": "gemv3", "nblk": nblk, "warps": warps, "rpt": rpt, "per_sm": per_sm}
        line = []
        for v in ("lut", "noshfl", "noabs", "stream"):
            G.unit_asm = variant(v) if v != "lut" else real
            t = timing.bench_graph(partial(L.forward_2d, x, pw, None, config=cfg), rep=20) * 1e3
            line.append(f"{v} {t:.2f}")
        G.unit_asm = real
        print(f"K={k} N={n} gemv3 {c}: " + ", ".join(line) + " us", flush=True)

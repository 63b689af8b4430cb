"""gemv3 (linear_4bit's M = 1 path, the per-block table in the lanes) against gemv2 and bnb.matmul_4bit on one
GPU: each candidate's output is checked against the K-aware policy first, then timed (CUDA-graph medians,
tritonbits_harness.timing.bench_graph); one line per (shape, dtype, blocksize, candidate).

    python ci/linear4bit_gemv3_probe.py [--shapes KxN,...] [--dtypes bf16,fp16] [--blocksizes 64,128]
        [--cands NBLKxWARPSxRPTxPER_SM,...] [--rep 20] [--no-bnb] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch

import tritonbits
from tritonbits.ops import linear_4bit as L
from tritonbits.quant_state import prepare
from tritonbits_harness import timing
from tritonbits_harness.bench.linear_4bit import parse_shapes
from tritonbits_harness.tolerance import assert_matmul

CANDS = "8x4x1x8,8x4x2x8,16x4x1x8,8x8x1x8,4x4x1x8,8x4x1x4,8x4x1x16,16x4x1x4,16x8x1x8,8x4x2x4"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="KxN,KxN,... (default: the benchmark's shapes)")
    ap.add_argument("--dtypes", default="bf16")
    ap.add_argument("--blocksizes", default="64")
    ap.add_argument("--cands", default=CANDS, help="NBLKxWARPSxRPTxPER_SM,...")
    ap.add_argument("--rep", type=int, default=20)
    ap.add_argument("--no-bnb", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for k, n in parse_shapes(args.shapes):
        for dname in args.dtypes.split(","):
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dname]
            for bs in (int(v) for v in args.blocksizes.split(",")):
                w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(dtype)
                packed, qs = tritonbits.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=True)
                pw, wd = prepare(packed, qs), tritonbits.dequantize_4bit(packed, qs)
                x = torch.randn(1, k, device="cuda", dtype=dtype, generator=gen)
                cfgs = [("gemv2", L.heuristic_gemv2_config(dtype, 1, n, k))]
                for c in args.cands.split(","):
                    nblk, warps, rpt, per_sm = (int(v) for v in c.split("x"))
                    cfgs.append((f"gemv3 {c}", {"path": "gemv3", "nblk": nblk, "warps": warps, "rpt": rpt,
                                                "per_sm": per_sm}))  # fmt: skip
                fns = []
                ref = None
                for name, cfg in cfgs:
                    if cfg["path"] == "gemv3" and L.gemv3_chunk(cfg, pw, 1, k, x.device) == 0:
                        print(f"K={k} N={n} {dname} bs{bs} {name}: gemv3 cannot run this problem", flush=True)
                        continue
                    try:
                        y = L.forward_2d(x, pw, None, config=cfg)
                        assert_matmul(y, x, wd)
                    except Exception as exc:  # a probe: log and go on
                        print(f"K={k} N={n} {dname} bs{bs} {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                        continue
                    ref = y if ref is None else ref
                    diff = (y.float() - ref.float()).abs().max().item()
                    fns.append((name, cfg, partial(L.forward_2d, x, pw, None, config=cfg), diff))
                if not args.no_bnb:
                    import bitsandbytes as bnb
                    import bitsandbytes.functional as F

                    bq, bstate = F.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=True)
                    fns.append(("bnb", None, partial(bnb.matmul_4bit, x, bq.t(), quant_state=bstate), 0.0))
                for name, cfg, fn, diff in fns:
                    t = timing.bench_graph(fn, rep=args.rep) * 1e3
                    gbs = (n * k // 2) / (t * 1e-6) / 1e9
                    rows.append({"k": k, "n": n, "dtype": dname, "bs": bs, "name": name, "config": cfg, "us": t,
                                 "gbps": gbs, "maxdiff_vs_gemv2": diff})  # fmt: skip
                    print(f"K={k:5d} N={n:5d} {dname} bs{bs} {name:22s} {t:8.2f} us {gbs:7.0f} GB/s "
                          f"(max |d| vs gemv2 {diff:.3g})", flush=True)  # fmt: skip
                del w, wd, pw, packed
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

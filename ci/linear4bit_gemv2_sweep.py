"""gemv2 (linear_4bit's decode path, M <= 2) over a grid of tiles, one line per (shape, M, tile) (--gemm: the
gemm's tiles too), for comparing two source trees on one GPU: run it once per tree (each tree's src/ first on
PYTHONPATH) in the same call and compare the lines. CUDA-graph medians (tritonbits_harness.timing.bench_graph);
each tile's output is checked against the K-aware policy before it is timed; x bf16 unless --dtype, W nf4 nested
blocksize 64.

    python ci/linear4bit_gemv2_sweep.py --tag NAME [--ms 1,2] [--shapes KxN,...] [--dtype bf16|fp16] [--gemm]
        [--prefetch] [--tiles BNxBKxWARPS,...] [--rows 1,2] [--rep 20] [--json PATH]
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

# (BLOCK_N, BLOCK_K, warps): a thread holds BLOCK_N * BLOCK_K / 8 / (32 * warps) words a row step (x: 8 fp32 each)
TILES = ((16, 256, 4), (8, 256, 2), (4, 256, 1), (32, 256, 8), (32, 256, 4), (16, 512, 4), (8, 512, 4),
         (8, 512, 2), (4, 512, 1), (16, 128, 4), (32, 128, 4), (8, 128, 1), (16, 1024, 4), (8, 1024, 4),
         (32, 512, 8), (64, 128, 8))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", required=True)
    ap.add_argument("--rep", type=int, default=20)
    ap.add_argument("--ms", default="1,2")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--shapes", default=None, help="KxN,KxN,... (default: the benchmark's shapes)")
    ap.add_argument("--gemm", action="store_true", help="also the tensor-core gemm's candidate tiles")
    ap.add_argument("--prefetch", action="store_true", help="every gemv2 tile with and without PREFETCH")
    ap.add_argument("--tiles", default=None, help="BNxBKxWARPS,... (default: TILES)")
    ap.add_argument("--rows", default="1,2", help="rows a program: these multiples of the op's rule (gemv2_rows)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = parse_shapes(args.shapes)
    rows = []
    for k, n in shapes:
        w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(dtype)
        packed, qs = tritonbits.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        pw, wd = prepare(packed, qs), tritonbits.dequantize_4bit(packed, qs)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
            cfgs = [("default", L.config_for(x.device, x.dtype, m, n, k))]
            tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")] if args.tiles else TILES
            for bn, bk, warps in tiles:
                if k % bk or bn * bk // 8 // (32 * warps) > 8:
                    continue
                base = L.gemv2_rows(1, n, k // bk, bn, sms)
                for r in sorted({max(bn, int(base * float(f)) // bn * bn) for f in args.rows.split(",")}):
                    for pf in (False, True) if args.prefetch else (m >= 2,):
                        cfgs.append((f"bn{bn} bk{bk} w{warps} r{r}{' pf' if pf else ''}",
                                     {"path": "gemv2", "bm": L.bucket(m), "bn": bn, "bk": bk, "warps": warps,
                                      "stages": 1, "rows": r, "prefetch": pf}))  # fmt: skip
            if args.gemm:
                from tritonbits_harness.tune import gemm_candidates

                for cfg in gemm_candidates(m, n, k, sms):
                    cfgs.append((f"gemm bn{cfg['bn']} bk{cfg['bk']} w{cfg['warps']} s{cfg['split_k']}", cfg))
            best = None
            for name, cfg in cfgs:
                try:
                    assert_matmul(L.forward_2d(x, pw, None, config=cfg), x, wd)
                except Exception as exc:  # a probe: log and go on
                    print(f"[{args.tag}] K={k} N={n} M={m} {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                t = timing.bench_graph(partial(L.forward_2d, x, pw, None, config=cfg), rep=args.rep) * 1e3
                rows.append({"tag": args.tag, "k": k, "n": n, "m": m, "name": name, "config": cfg, "us": t})
                print(f"[{args.tag}] K={k:5d} N={n:5d} M={m} {name:28s} {t:8.2f} us", flush=True)
                if name != "default" and (best is None or t < best[0]):
                    best = (t, name)
            if best:
                print(f"[{args.tag}] BEST K={k:5d} N={n:5d} M={m} {best[1]:28s} {best[0]:8.2f} us", flush=True)
        del w, wd, pw, packed
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

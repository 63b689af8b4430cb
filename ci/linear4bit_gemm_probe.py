"""linear_4bit's tensor-core gemm (W as the dot's left operand, words decoded in PTX) against the path
linear_4bit takes by default (config_for: the table, else the heuristic), bnb.matmul_4bit, dequantize + F.linear
and dense F.linear, side by side on one GPU (the three src/ trees on PYTHONPATH):

    python ci/linear4bit_gemm_probe.py [--rep 20] [--ms 1,2,4,8,16,32,64,128,256] [--shapes KxN,...] [--json PATH]

Per (K, N) of the issue's shapes and M: every gemm tile of the tuner's candidate list
(tritonbits_harness.tune.gemm_candidates), each output checked against the K-aware policy before it is timed
(CUDA-graph medians, tritonbits_harness.timing.bench_graph); x bf16, W nf4 nested blocksize 64. Prints the best
gemm tile per case beside the others; --json writes every timing.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import triton

import tritonbits
from tritonbits.ops import linear_4bit as L
from tritonbits.quant_state import prepare
from tritonbits_harness import timing
from tritonbits_harness.bench.linear_4bit import parse_shapes
from tritonbits_harness.tolerance import assert_matmul
from tritonbits_harness.tune import gemm_candidates


def us(fn, rep: int) -> float:
    return timing.bench_graph(fn, rep=rep) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rep", type=int, default=20)
    ap.add_argument("--ms", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--shapes", default=None, help="KxN,KxN,... (default: the benchmark's shapes)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    print(torch.cuda.get_device_name(), flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    shapes = parse_shapes(args.shapes)
    for k, n in shapes:
        w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
        packed, qs = tritonbits.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        bpacked, bqs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        pw = prepare(packed, qs)
        wd = tritonbits.dequantize_4bit(packed, qs)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            cur = L.config_for(x.device, x.dtype, m, n, k)
            t = {"table": us(partial(L.forward_2d, x, pw, None, config=cur), args.rep),
                 "bnb": us(partial(bnb.matmul_4bit, x, bpacked.t(), bqs), args.rep),
                 "dequant": us(partial(L.forward_2d, x, pw, None, config={"path": "dequant"}), args.rep),
                 "dense": us(partial(torch.nn.functional.linear, x, w), args.rep)}  # fmt: skip
            best = None
            for cfg in gemm_candidates(m, n, k, sms):
                try:
                    out = L.forward_2d(x, pw, None, config=cfg)
                except triton.runtime.errors.OutOfResources as exc:
                    print(f"K={k} N={n} M={m} {cfg}: {exc}", flush=True)
                    continue
                try:
                    assert_matmul(out[:8], x[:8], wd)
                except AssertionError as exc:
                    print(f"K={k} N={n} M={m} {cfg}: OUTSIDE THE POLICY, not timed: {str(exc)[:300]}", flush=True)
                    continue
                tg = us(partial(L.forward_2d, x, pw, None, config=cfg), args.rep)
                rows.append({"k": k, "n": n, "m": m, "config": cfg, "us": tg})
                if best is None or tg < best[0]:
                    best = (tg, cfg)
            if best is None:
                continue
            rows.append({"k": k, "n": n, "m": m, "baselines": t, "table_config": cur})
            tg, cfg = best
            tile = f"bm{cfg['bm']} bn{cfg['bn']} bk{cfg['bk']} w{cfg['warps']} s{cfg['split_k']}"
            print(f"K={k:5d} N={n:5d} M={m:3d}: gemm {tg:6.1f} us ({tile:26s}) default[{cur['path']}] "
                  f"{t['table']:6.1f} bnb {t['bnb']:6.1f} dequant {t['dequant']:6.1f} dense {t['dense']:6.1f}  "
                  f"gemm x default {t['table'] / tg:.2f} x bnb {t['bnb'] / tg:.2f} x dense {t['dense'] / tg:.2f}",
                  flush=True)  # fmt: skip
        del w, wd, pw, packed, bpacked
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

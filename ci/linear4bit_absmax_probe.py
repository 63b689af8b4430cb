"""What the nested absmax costs linear_4bit's fused paths: the same weight quantized nested (uint8 absmax +
state2, decoded in-kernel per row step) and plain (fp32 absmax), same config, side by side on one GPU:

    python ci/linear4bit_absmax_probe.py [--rep 20] [--ms 1,2,4,16] [--shapes KxN,...]

Per (K, N) and M: the default config (config_for) timed on both weights (CUDA-graph medians), bnb.matmul_4bit on
both, each tritonbits output checked against the K-aware policy first. x bf16, nf4 blocksize 64.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

import tritonbits
from tritonbits.ops import linear_4bit as L
from tritonbits.quant_state import prepare
from tritonbits_harness import timing
from tritonbits_harness.bench.linear_4bit import parse_shapes
from tritonbits_harness.tolerance import assert_matmul


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rep", type=int, default=20)
    ap.add_argument("--ms", default="1,2,4,16")
    ap.add_argument("--shapes", default=None, help="KxN,KxN,... (default: the benchmark's shapes)")
    args = ap.parse_args()
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    print(torch.cuda.get_device_name(), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = parse_shapes(args.shapes)
    for k, n in shapes:
        w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
        weights = {}
        for nested in (True, False):
            packed, qs = tritonbits.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
            bpacked, bqs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
            weights[nested] = (prepare(packed, qs), tritonbits.dequantize_4bit(packed, qs), bpacked, bqs)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            cfg = L.config_for(x.device, x.dtype, m, n, k)
            t = {}
            for nested, (pw, wd, bpacked, bqs) in weights.items():
                assert_matmul(L.forward_2d(x, pw, None, config=cfg)[:8], x[:8], wd)
                tag = "nested" if nested else "plain"
                t[tag] = timing.bench_graph(partial(L.forward_2d, x, pw, None, config=cfg), rep=args.rep) * 1e3
                t[f"bnb-{tag}"] = timing.bench_graph(partial(bnb.matmul_4bit, x, bpacked.t(), bqs), rep=args.rep) * 1e3
            print(f"K={k:5d} N={n:5d} M={m:3d} {cfg['path']:7s} nested {t['nested']:7.1f} plain {t['plain']:7.1f} "
                  f"(x{t['nested'] / t['plain']:.2f})  bnb nested {t['bnb-nested']:7.1f} plain {t['bnb-plain']:7.1f}"
                  f"  cfg {cfg}", flush=True)  # fmt: skip
        del weights, w


if __name__ == "__main__":
    main()

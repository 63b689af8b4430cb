"""linear_4bit gemv2 with and without PREFETCH (the next row step's words and absmax loaded before the current
step is decoded), side by side on one GPU (the three src/ trees on PYTHONPATH):

    python ci/linear4bit_prefetch_probe.py [--rep 30]

Per (K, N) of the issue's decode shapes and M in 1, 2, 4: the GPU family's table config (else the heuristic's),
run with prefetch off and on; the two outputs must be torch.equal (the same products in the same order), then
both and bnb.matmul_4bit are timed with tritonbits_harness.timing.bench_graph. x bf16, W nf4 nested blocksize 64.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

import tritonbits
from tritonbits.ops import linear_4bit as L
from tritonbits.quant_state import prepare
from tritonbits_harness import timing

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (8192, 28672)]  # (K, N)


def us(fn, rep: int) -> float:
    return timing.bench_graph(fn, rep=rep) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rep", type=int, default=30)
    args = ap.parse_args()
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    print(torch.cuda.get_device_name(), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for k, n in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        packed, qs = tritonbits.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        bpacked, bqs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        del w
        pw = prepare(packed, qs)
        for m in (1, 2, 4):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            cfg = L.config_for(x.device, x.dtype, m, n, k)
            if cfg.get("path") != "gemv2":
                print(f"K={k} N={n} M={m}: table path {cfg.get('path')}, skipped", flush=True)
                continue
            off = partial(L.forward_2d, x, pw, None, config={**cfg, "prefetch": False})
            on = partial(L.forward_2d, x, pw, None, config={**cfg, "prefetch": True})
            same = torch.equal(off(), on())
            t_off, t_on = us(off, args.rep), us(on, args.rep)
            t_bnb = us(partial(bnb.matmul_4bit, x, bpacked.t(), bqs), args.rep)
            print(f"K={k:5d} N={n:5d} M={m}: prefetch off {t_off:6.1f} us, on {t_on:6.1f} us ({t_off / t_on:.3f}x), "
                  f"bnb {t_bnb:6.1f} us (x bnb {t_bnb / t_off:.2f} -> {t_bnb / t_on:.2f}), "
                  f"{'equal' if same else 'NOT EQUAL'}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

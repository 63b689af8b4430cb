"""dequantize_blockwise launch sweep (GPU machine; the three src/ trees on PYTHONPATH): the kernel's tile and
warps (`blockwise_8bit.DEQUANT_TILE` / `DEQUANT_WARPS`), each variant checked equal (torch.equal) to the
module default's output and timed next to a device copy of the same bytes in one run.

    python ci/dequantize_blockwise_probe.py [--sizes 26 28] [--dtypes bf16 fp32 fp16]

CUDA-graph medians (tritonbits_harness.timing.bench_graph); bytes = n codes read + n outputs written + absmax.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

import tritonbits
from tritonbits.ops import blockwise_8bit as b8
from tritonbits_harness import timing

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
VARIANTS = [(t, w) for t in (1024, 2048, 4096, 8192) for w in (2, 4, 8)]


def graph_us(fn) -> float:
    return timing.bench_graph(fn, rep=40) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[26, 28])
    ap.add_argument("--dtypes", nargs="*", default=["bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--blocksize", type=int, default=4096)
    args = ap.parse_args()
    default = (b8.DEQUANT_TILE, b8.DEQUANT_WARPS)
    print(torch.cuda.get_device_name(), f"default tile/warps {default}", flush=True)
    for p in args.sizes:
        for dt in args.dtypes:
            n, bs = 1 << p, args.blocksize
            x = torch.randn(n, device="cuda", dtype=DTYPES[dt]) * 3
            q, st = tritonbits.quantize_blockwise(x, blocksize=bs)
            code = st.code
            want = tritonbits.dequantize_blockwise(q, st)
            out = torch.empty_like(want)
            nbytes = n + n * x.element_size() + 4 * (-(-n // bs))
            src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            copy = graph_us(partial(dst.copy_, src))
            print(f"--- 2^{p} {dt} bs{bs}: copy {copy:.1f} us", flush=True)
            for tile, warps in VARIANTS:
                b8.DEQUANT_TILE, b8.DEQUANT_WARPS = tile, warps
                try:
                    out.fill_(float("nan"))
                    b8.launch_dequantize(q, st.absmax, code, out, bs)
                    ok = torch.equal(out, want)
                    us = graph_us(partial(b8.launch_dequantize, q, st.absmax, code, out, bs))
                    mark = " (default)" if (tile, warps) == default else ""
                    print(f"  tile {tile:5d} warps {warps}: {us:7.1f} us {100 * copy / us:5.1f}% of copy "
                          f"{'equal' if ok else 'NOT EQUAL'}{mark}", flush=True)  # fmt: skip
                finally:
                    b8.DEQUANT_TILE, b8.DEQUANT_WARPS = default
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

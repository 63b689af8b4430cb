"""Where the GPU time of a call goes (GPU machine; the three src/ trees on PYTHONPATH): per-kernel device time
from torch.profiler (CUPTI) for one eager call of each case, next to the call's CUDA-graph median
(tritonbits_harness.timing.bench_graph). The difference between the graph time and the kernels' sum is the gaps
between kernels inside the graph.

    python ci/kernel_breakdown.py [--only quantize linear blockwise dequant_bias] [--reps 20]

Cases: quantize_4bit nested nf4/fp4 (bf16, 14336x4096) and bnb's; linear_4bit at M=1 and bnb.matmul_4bit;
dequantize_blockwise bf16/fp32 at 2**26 and a copy of the same bytes; dequant_bias fp32 acc at 128, 4096 and 64
x 28672 and its static-shape torch.compile.
Prints one block per case: kernel name (truncated), calls per eager call, device us per call.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

import tritonbits
from tritonbits_harness import timing


def kernels(fn, reps: int) -> list[tuple[str, float, float]]:
    """[(kernel, calls per fn call, device us per fn call)] over `reps` eager calls, after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name].append(ev.time_range.elapsed_us())
    return sorted(((k, len(v) / reps, sum(v) / reps) for k, v in total.items()), key=lambda r: -r[2])


def show(name: str, fn, reps: int, graph: bool = True) -> None:
    rows = kernels(fn, reps)
    ksum = sum(r[2] for r in rows)
    g = timing.bench_graph(fn, rep=50) * 1e3 if graph else float("nan")
    print(f"--- {name}: kernels {ksum:.1f} us, graph {g:.1f} us (gaps {g - ksum:.1f} us)", flush=True)
    for k, calls, us in rows:
        print(f"    {us:8.1f} us  x{calls:4.1f}  {k[:110]}", flush=True)


def quantize(reps: int) -> None:
    import bitsandbytes.functional as F

    x = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    for qt in ("nf4", "fp4"):
        for nested in (True, False):
            ours = partial(tritonbits.quantize_4bit, x, blocksize=64, quant_type=qt, compress_statistics=nested)
            show(f"tritonbits quantize_4bit {qt} nested={nested}", ours, reps)
        theirs = partial(F.quantize_4bit, x, blocksize=64, quant_type=qt, compress_statistics=True)
        show(f"bnb quantize_4bit {qt} nested", theirs, reps, graph=False)


def linear(reps: int) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    for k, n in ((4096, 14336), (14336, 4096), (8192, 28672)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        packed, qs = tritonbits.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        bpacked, bqs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        show(f"tritonbits linear_4bit M=1 K={k} N={n}", partial(tritonbits.linear_4bit, x, packed, qs), reps)
        show(f"bnb matmul_4bit M=1 K={k} N={n}", partial(bnb.matmul_4bit, x, bpacked.t(), bqs), reps)
        del w


def blockwise(reps: int) -> None:
    for dt in (torch.bfloat16, torch.float32):
        x = torch.randn(1 << 26, device="cuda", dtype=dt)
        q, st = tritonbits.quantize_blockwise(x)
        show(f"tritonbits quantize_blockwise {dt} 2^26", partial(tritonbits.quantize_blockwise, x), reps)
        show(f"tritonbits dequantize_blockwise {dt} 2^26", partial(tritonbits.dequantize_blockwise, q, st), reps)
        half = q.numel() * (1 + x.element_size()) // 2
        src = torch.empty(half, dtype=torch.uint8, device="cuda")
        show(f"copy of the same bytes ({dt})", partial(torch.empty_like(src).copy_, src), reps)


def dequant_bias(reps: int) -> None:
    for m, n in ((128, 28672), (4096, 28672), (64, 28672)):
        acc = torch.randn(m, n, device="cuda", dtype=torch.float32)
        sa = torch.rand(m, 1, device="cuda") + 0.5
        sb = torch.rand(1, n, device="cuda") + 0.5
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        f = torch.compile(lambda a, s1, s2, b: (a.float() * s1 * s2 + b.float()).to(torch.bfloat16), dynamic=False)
        show(f"tritonbits dequant_bias {m}x{n} fp32", partial(tritonbits.dequant_bias, acc, sa, sb, bias), reps)
        show(f"torch.compile static {m}x{n} fp32", partial(f, acc, sa, sb, bias), reps)


CASES = {"quantize": quantize, "linear": linear, "blockwise": blockwise, "dequant_bias": dequant_bias}

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for name in args.only:
        try:
            CASES[name](args.reps)
        except Exception as exc:  # one failing group must not end the probe
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)

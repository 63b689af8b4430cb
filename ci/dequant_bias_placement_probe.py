# ruff: noqa: B023  (a probe script: every lambda is used in the iteration that makes it)
"""Does where the operands land in memory move dequant_bias's time at L2-resident sizes? (GPU machine, the three
src/ trees on PYTHONPATH.) Session 14's grid timed the public op at fp32 128 x 28672 at 5.23 us where an earlier
probe (log 20261123T0938Z, the table then on ('2d', 16, 128, 8)) had 3.96 us, while the compiled expression stayed
at 4.6-4.7 us. For each case and each of --trials fresh operand sets (after a pad tensor of a random size, a
multiple of 4 KiB up to 64 MiB, meant to move them; the caching allocator still put most accumulators at the same
offset past a 2 MiB boundary, which each line logs), CUDA-graph p50 (timing.bench_graph, rep 20 ms, as the
benchmark times; the logs of session 16 called do_bench_cudagraph on the default stream) of:
the public op (the table's config), forced configs through `launch` with a preallocated out, and the static-shape
torch.compile of the expression (compiled once per case). One line per (case, trial); a summary of each
variant's min / median / max over the trials.

    python ci/dequant_bias_placement_probe.py [--trials 6] [--cases MxNxACC,...] [--seed 0]
    python ci/dequant_bias_placement_probe.py --offsets [--cases ...]

--offsets: instead, the table's config (and `1d 1024/8`) through `launch` with out, then acc, placed at byte offsets
0, 256, 512, 1 KiB, 4 KiB, 64 KiB, 1 MiB past a 2 MiB boundary (views into one larger buffer), and the public op
with out= each of those outs.
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch
import triton

import tritonbits
from tritonbits.ops import dequant_bias as db
from tritonbits_harness import timing
from tritonbits_harness.bench import dequant_bias as bench

CASES = "128x28672xfp32,128x28672xint32,256x14336xfp32,256x13824xfp32,2048x2560xint32,512x11008xint32,256x28672xbf16"
FORCED = (("1d", 1024, 8), ("1d", 1024, 4), ("2d", 16, 128, 8), ("2d", 32, 128, 4))


def t(fn) -> float:
    return timing.bench_graph(fn, rep=20) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--cases", default=CASES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--offsets", action="store_true")
    args = ap.parse_args()
    if args.offsets:
        offsets_probe(args.cases)
        return
    rng = random.Random(args.seed)
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "triton", triton.__version__, "torch", torch.__version__, flush=True)
    for spec in args.cases.split(","):
        m, n, acc_name = spec.split("x")
        case = {"m": int(m), "n": int(n), "acc": acc_name}
        comp = bench.compiled_for_case()
        table_cfg = db.config_for(dev, bench.ACC[acc_name], case["m"], case["n"], True)
        names = ["public op", *(str(c) for c in FORCED), "torch.compile"]
        times: dict[str, list[float]] = {k: [] for k in names}
        print(f"\n== {spec}: table config {table_cfg}; us (CUDA-graph p50)", flush=True)
        for trial in range(args.trials):
            pad = torch.empty(rng.randrange(0, 1 << 14) * 4096, dtype=torch.uint8, device=dev)
            a, sa, sb, bias = bench.operands(case, dev)
            out = torch.empty(a.shape, dtype=bench.OUT, device=dev)
            strides = db.validate(a, sa, sb, bias, bench.OUT, out)
            row = {"public op": t(lambda: tritonbits.dequant_bias(a, sa, sb, bias, out_dtype=bench.OUT))}
            for c in FORCED:
                row[str(c)] = t(lambda: db.launch(a, sa, sb, bias, out, *strides, config=c))
            comp(a, sa, sb, bias, out_dtype=bench.OUT)
            row["torch.compile"] = t(lambda: comp(a, sa, sb, bias, out_dtype=bench.OUT))
            for k, v in row.items():
                times[k].append(v)
            print(f"trial {trial} pad {pad.numel() >> 10:6d} KiB acc@{a.data_ptr() % (1 << 21):#9x} "
                  + "  ".join(f"{k} {v:6.2f}" for k, v in row.items()), flush=True)  # fmt: skip
        for k, v in times.items():
            print(f"  {k:18s} min {min(v):6.2f}  median {statistics.median(v):6.2f}  max {max(v):6.2f}", flush=True)


OFFSETS = (0, 256, 512, 1024, 4096, 1 << 16, 1 << 20)


def offsets_probe(cases: str) -> None:
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "triton", triton.__version__, "torch", torch.__version__, flush=True)
    for spec in cases.split(","):
        m, n, acc_name = spec.split("x")
        case = {"m": int(m), "n": int(n), "acc": acc_name}
        a0, sa, sb, bias = bench.operands(case, dev)
        cfg = db.config_for(dev, a0.dtype, case["m"], case["n"], True)
        print(f"\n== {spec}: table config {cfg}; us (CUDA-graph p50) by byte offset past a 2 MiB boundary", flush=True)
        nout = a0.numel() * bench.OUT.itemsize
        obuf = torch.empty((1 << 21) + (2 << 20) + nout, dtype=torch.uint8, device=dev)
        abuf = torch.empty((1 << 21) + (2 << 20) + a0.numel() * a0.element_size(), dtype=torch.uint8, device=dev)
        obase = -obuf.data_ptr() % (1 << 21)
        abase = -abuf.data_ptr() % (1 << 21)
        for what in ("out", "acc"):
            for off in OFFSETS:
                a = a0
                out = torch.empty(a0.shape, dtype=bench.OUT, device=dev)
                if what == "out":
                    out = obuf[obase + off : obase + off + nout].view(bench.OUT).view(a0.shape)
                else:
                    nb = a0.numel() * a0.element_size()
                    a = abuf[abase + off : abase + off + nb].view(a0.dtype).view(a0.shape)
                    a.copy_(a0)
                strides = db.validate(a, sa, sb, bias, bench.OUT, out)
                row = {str(c): t(lambda: db.launch(a, sa, sb, bias, out, *strides, config=c))
                       for c in (cfg, ("1d", 1024, 8))}  # fmt: skip
                row["public op, out="] = t(lambda: tritonbits.dequant_bias(a, sa, sb, bias, out_dtype=bench.OUT,
                                                                            out=out))  # fmt: skip
                print(f"{what} +{off:8d} B  " + "  ".join(f"{k} {v:6.2f}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()

# ruff: noqa: B023  (a probe script: every lambda is used in the iteration that makes it)
"""Why the public dequant_bias and the tuner's timing of the same config disagree at L2-resident sizes (run on a
GPU machine, the three src/ trees on PYTHONPATH). For each case, CUDA-graph p20/p50/p80 (do_bench_cudagraph,
rep 20 ms, as the benchmark times) of: the public op; `launch` with the table's config and out allocated per
call (the tuner); the same with a preallocated out; the jitted kernel launched by Triton itself; every tuner
candidate through the public-op launch path; a static-shape torch.compile of the expression.
Usage: dequant_bias_point_probe.py OUTDIR"""

import functools
import sys
from pathlib import Path

import torch
import triton

import tritonbits
from tritonbits.ops import dequant_bias as db
from tritonbits_harness import tune
from tritonbits_harness.bench import dequant_bias as bench

CASES = [(128, 28672, "fp32"), (128, 28672, "int32"), (4096, 2560, "bf16"), (128, 14336, "fp32")]
Q = [0.2, 0.5, 0.8]


def t(fn):
    return [round(v * 1e3, 2) for v in triton.testing.do_bench_cudagraph(fn, rep=20, quantiles=Q)]


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    log = (out_dir / "dequant_bias_point_probe.txt").open("w")

    def say(*a):
        print(*a, flush=True)
        print(*a, file=log, flush=True)

    say(torch.cuda.get_device_name(), "triton", triton.__version__, "torch", torch.__version__)
    for m, n, acc_name in CASES:
        a, sa, sb, bias = bench.operands({"m": m, "n": n, "acc": acc_name}, torch.device("cuda"))
        strides = db.validate(a, sa, sb, bias, bench.OUT, None)
        cfg = db.config_for(a.device, a.dtype, m, n, True)
        say(f"\n== m={m} n={n} acc={acc_name}: table config {cfg}  (us: p20, p50, p80)")
        say("public op            ", t(lambda: tritonbits.dequant_bias(a, sa, sb, bias, out_dtype=bench.OUT)))

        def alloc_launch(c):
            out = torch.empty(a.shape, dtype=bench.OUT, device=a.device)
            db.launch(a, sa, sb, bias, out, *strides, config=c)

        say("launch, alloc        ", t(functools.partial(alloc_launch, cfg)))
        pre = torch.empty(a.shape, dtype=bench.OUT, device=a.device)
        say("launch, prealloc     ", t(lambda: db.launch(a, sa, sb, bias, pre, *strides, config=cfg)))
        p = db.plan(a, sa, sb, bias, pre, *strides, config=cfg)
        say("triton's own launch  ", t(lambda: p.kernel[p.grid](*p.args, **p.constexprs, **p.options)))
        torch._dynamo.reset()
        comp = torch.compile(bench.dequant_bias_expression, dynamic=False)
        comp(a, sa, sb, bias, out_dtype=bench.OUT)
        say("torch.compile        ", t(lambda: comp(a, sa, sb, bias, out_dtype=bench.OUT)))
        for c in tune.candidate_configs(m):
            try:
                say(f"cand {c!s:22s}", t(functools.partial(alloc_launch, c)))
            except Exception as e:  # a probe: log and go on
                say(f"cand {c}: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

# ruff: noqa: B023  (a probe script: every lambda is used in the iteration that makes it)
"""int32 against int64 element indices in dequant_bias's flat ("1d") kernel at the points where the H100 full
grid (bench shards 20261124T0252Z-0258Z) lost to static torch.compile at M*N >= 1M: L2-resident sizes, 5-37 us.
Offline (ci/sass_count.py's compile, triton 3.6, sm90) the int64 index math costs 13.25 -> 11.25 SASS instructions
a value (bf16 acc) and 16.0-16.5 -> 14.75 (int32 acc). Per point, CUDA graphs (do_bench_cudagraph, rep 20 ms,
output allocated per call as the benchmark does), interleaved rounds, medians (x = torch.compile time / this): the
public op (the table's config), the flat kernel with the heuristic's ("1d", BLOCK, warps) and int32 indices, the same
with INT64=True, and the compiled expression. Run on a GPU machine with
the three src/ trees on PYTHONPATH: python ci/dequant_bias_index_probe.py [--rounds 3]"""

import argparse
import statistics

import torch
import triton

import tritonbits
from tritonbits.ops import dequant_bias as db
from tritonbits_harness.bench import dequant_bias as bench

POINTS = [("bf16", 2048, 3840), ("bf16", 2048, 4096), ("bf16", 512, 11008), ("bf16", 512, 14336),
          ("bf16", 256, 28672), ("bf16", 2048, 2560), ("fp32", 512, 11008), ("fp32", 2048, 4096),
          ("int32", 128, 28672), ("int32", 2048, 4096), ("int32", 4096, 4096), ("int32", 512, 11008),
          ("int32", 2048, 2560), ("bf16", 4096, 4096), ("bf16", 65536, 28672), ("int32", 65536, 14336)]  # fmt: skip


def graph_us(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=20) * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(torch.cuda.get_device_name(), "triton", triton.__version__, "torch", torch.__version__)
    for acc_name, m, n in POINTS:
        a, sa, sb, bias = bench.operands({"m": m, "n": n, "acc": acc_name}, torch.device("cuda"))
        strides = db.validate(a, sa, sb, bias, bench.OUT, None)

        flat = ("1d", 256 * (16 // a.element_size()), 8)  # session 13's flat heuristic: 16-byte acc loads

        def flat_launch(int64: bool):
            out = torch.empty(m, n, dtype=bench.OUT, device="cuda")
            pl = db.plan(a, sa, sb, bias, out, *strides, config=flat)
            pl.launcher(pl.grid, pl.args, {**pl.constexprs, "INT64": int64}, pl.options, a.device)
            return out

        compiled = bench.compiled_for_case()
        calls = {"public op": lambda: tritonbits.dequant_bias(a, sa, sb, bias, out_dtype=bench.OUT),
                 "1d int32": lambda: flat_launch(False), "1d int64": lambda: flat_launch(True),
                 "torch.compile": lambda: compiled(a, sa, sb, bias, out_dtype=bench.OUT)}  # fmt: skip
        want = calls["1d int32"]()
        assert torch.equal(calls["1d int64"](), want), "int64 indices changed the answer"
        taken = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, fn in calls.items():
                taken[name].append(graph_us(fn))
        med = {name: statistics.median(v) for name, v in taken.items()}
        cfg = db.plan(a, sa, sb, bias, want, *strides).config
        comp = med["torch.compile"]
        cells = ", ".join(
            f"{name} {us:.2f} us ({comp / us:.3f}x)" for name, us in med.items() if name != "torch.compile"
        )
        print(f"{acc_name:5} M={m:6} N={n:6} table {cfg}, 1d {flat}: {cells}; torch.compile {comp:.2f} us", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

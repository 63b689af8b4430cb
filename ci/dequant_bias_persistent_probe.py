# ruff: noqa: B023  (a probe script: every lambda is used in the iteration that makes it)
"""Does a persistent grid help dequant_bias at its roofline sizes? (run on a GPU machine, the three src/ trees on
PYTHONPATH.) The flat ("1d") kernel launches one program per BLOCK elements, so a 16M-element problem runs ~8 waves
of programs and its last wave part-full; a persistent version launches SMs x P programs that stride over the
blocks. Per case, CUDA-graph medians (do_bench_cudagraph, rep 20 ms, as the benchmark times) of: the public op
(table config); the flat kernel with its stores streaming (`.cs`); persistent variants p<P>b<BLOCK>w<warps>;
the static-shape torch.compile of the one-line expression. Rounds rotate the order; the figure is the median of
the rounds' medians (log 20261125T0153Z was taken before return_mode="median": its rounds are means). The
streaming-store and persistent variants run their own BLOCK / warps with a mask, not the op's table config. Every
variant's output is checked with torch.equal against the public op's first.
Usage: dequant_bias_persistent_probe.py [--rounds 3] [--cases M:N:acc,...] > log"""

import argparse
import statistics

import torch
import triton
import triton.language as tl

import tritonbits
from tritonbits.ops import dequant_bias as db
from tritonbits_harness.bench import dequant_bias as bench

DEFAULT_CASES = (
    [(m, n, "bf16") for m in (4096, 16384) for n in (1000, 2560, 4096, 6144, 11008, 14336, 28672)]
    + [(m, n, a) for a in ("int32", "fp32") for m in (4096, 16384) for n in (4096, 14336)]
    + [(2048, 4096, "bf16"), (1024, 11008, "bf16"), (512, 14336, "bf16"), (8192, 2560, "bf16"), (2048, 11008, "bf16")]
)
VARIANTS = [(8, 1024, 4), (16, 1024, 4), (8, 2048, 4), (4, 4096, 8), (8, 4096, 8)]  # (P, BLOCK, warps)


@triton.jit
def _block(acc_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, t, TOTAL, N: tl.constexpr, BLOCK: tl.constexpr,
           CS: tl.constexpr):  # fmt: skip
    """Block t of the flat stream, as the op's flat kernel computes it; CS: streaming stores."""
    idx = t * BLOCK + tl.arange(0, BLOCK)
    mask = idx < TOTAL
    row, col = idx // N, idx % N
    acc = tl.load(acc_ptr + idx, mask=mask, other=0).to(tl.float32)
    sa = tl.load(sa_ptr + row, mask=mask, other=0.0, eviction_policy="evict_last")
    sb = tl.load(sb_ptr + col, mask=mask, other=0.0, eviction_policy="evict_last")
    bias = tl.load(bias_ptr + col, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
    out = (acc * sa * sb + bias).to(out_ptr.dtype.element_ty)
    if CS:
        tl.store(out_ptr + idx, out, mask=mask, cache_modifier=".cs")
    else:
        tl.store(out_ptr + idx, out, mask=mask)


@triton.jit
def _flat_cs(acc_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, TOTAL, N: tl.constexpr, BLOCK: tl.constexpr):
    _block(acc_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, tl.program_id(0), TOTAL, N, BLOCK, True)


@triton.jit
def _persistent(acc_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, TOTAL, TILES, N: tl.constexpr, BLOCK: tl.constexpr):
    for t in range(tl.program_id(0), TILES, tl.num_programs(0)):
        _block(acc_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, t, TOTAL, N, BLOCK, False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default=None, help="M:N:acc,... (default: the roofline and mid-size points)")
    args = ap.parse_args()
    cases = DEFAULT_CASES
    if args.cases:
        cases = [(int(m), int(n), a) for m, n, a in (c.split(":") for c in args.cases.split(","))]
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(torch.cuda.get_device_name(), "SMs", sms, "triton", triton.__version__, "torch", torch.__version__,
          flush=True)  # fmt: skip
    ratios: dict[str, list[float]] = {}
    for m, n, acc_name in cases:
        acc, sa, sb, bias = bench.operands({"m": m, "n": n, "acc": acc_name}, dev)
        total = m * n
        outs: dict[str, torch.Tensor] = {}
        fns = {"op": lambda: tritonbits.dequant_bias(acc, sa, sb, bias, out_dtype=bench.OUT)}

        def flat_cs(block=1024, warps=4):
            out = outs.setdefault("cs", torch.empty(m, n, dtype=bench.OUT, device=dev))
            _flat_cs[(triton.cdiv(total, block),)](acc, sa, sb, bias, out, total, N=n, BLOCK=block, num_warps=warps)

        fns["cs"] = flat_cs
        for p, block, warps in VARIANTS:
            name = f"p{p}b{block}w{warps}"
            tiles = triton.cdiv(total, block)

            def run(name=name, p=p, block=block, warps=warps, tiles=tiles):
                out = outs.setdefault(name, torch.empty(m, n, dtype=bench.OUT, device=dev))
                _persistent[(min(tiles, sms * p),)](acc, sa, sb, bias, out, total, tiles, N=n, BLOCK=block,
                                                    num_warps=warps)  # fmt: skip

            fns[name] = run
        compiled = bench.compiled_for_case()
        fns["compile"] = lambda: compiled(acc, sa, sb, bias, out_dtype=bench.OUT)
        want = fns["op"]()
        for name, fn in fns.items():
            got = fn()
            got = outs.get(name, got)
            torch.cuda.synchronize()
            if not torch.equal(got, want):
                print(f"  {name}: NOT EQUAL to the op's output", flush=True)
        times: dict[str, list[float]] = {k: [] for k in fns}
        names = list(fns)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                times[name].append(triton.testing.do_bench_cudagraph(fns[name], rep=20, return_mode="median") * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        cfg = db.config_for(dev, acc.dtype, m, n)
        cells = " ".join(f"{k}={v:.2f}" for k, v in med.items())
        best = min((k for k in med if k != "compile"), key=med.get)
        print(f"M={m:6d} N={n:6d} {acc_name:5s} table {cfg}: {cells} | compile/op {med['compile'] / med['op']:.3f} "
              f"compile/best {med['compile'] / med[best]:.3f} ({best})", flush=True)  # fmt: skip
        for k in med:
            if k != "compile":
                ratios.setdefault(k, []).append(med["compile"] / med[k])
    print("compile / variant over the cases (min, median, max, cases under 1.0):")
    for k, v in ratios.items():
        print(f"  {k:12s} {min(v):.3f} {statistics.median(v):.3f} {max(v):.3f} {sum(x < 1.0 for x in v)}/{len(v)}")


if __name__ == "__main__":
    main()

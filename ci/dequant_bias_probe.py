"""Where dequant_bias loses to a static-shape torch.compile (run on a GPU machine, the three src/ trees on
PYTHONPATH): for the cases the bench records show losing, print Inductor's generated kernel and time, in CUDA
graphs with the output allocated per call as the benchmark does, the compiled expression, the public op,
every tuner candidate, and an Inductor-like flat kernel with N as a compile-time constant (division by a
constant, per-element gathers of the per-row and per-column operands). Usage: probe.py OUTDIR."""

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch._inductor.utils import run_and_get_code

import tritonbits
from tritonbits.ops import dequant_bias as db
from tritonbits_harness import timing, tune
from tritonbits_harness.bench import dequant_bias as bench

CASES = [(65536, 28672, "bf16"), (16384, 14336, "bf16"), (4096, 1000, "int32"), (4096, 1000, "bf16"),
         (2048, 2560, "int32"), (512, 6144, "fp32"), (128, 28672, "int32"), (4096, 14336, "int32"),
         (65536, 28672, "int32")]  # fmt: skip


@triton.jit
def _flat_const_n(acc_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, TOTAL, N: tl.constexpr, BLOCK: tl.constexpr,
                  IDX64: tl.constexpr, EVEN: tl.constexpr, ACC_EVICT: tl.constexpr):  # fmt: skip
    """Inductor's shape: flat index, row = idx // N and col = idx % N with N a compile-time constant (a
    multiply-shift), per-element gathers; int32 indices when M*N fits (IDX64 off), no mask when EVEN."""
    if IDX64:
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = tl.full([BLOCK], True, tl.int1) if EVEN else idx < TOTAL
    row = idx // N
    col = idx % N
    acc = tl.load(acc_ptr + idx, mask=mask, other=0, eviction_policy=ACC_EVICT).to(tl.float32)
    sa = tl.load(sa_ptr + row, mask=mask, other=0.0, eviction_policy="evict_last")
    sb = tl.load(sb_ptr + col, mask=mask, other=0.0, eviction_policy="evict_last")
    bias = tl.load(bias_ptr + col, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
    out = acc * sa * sb + bias
    tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=mask)


def main(outdir: Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for m, n, acc_name in CASES:
        lines += probe_case(m, n, acc_name, outdir)
        print("\n".join(lines[-15:]), flush=True)
    (outdir / "probe.txt").write_text("\n".join(lines) + "\n")


def probe_case(m: int, n: int, acc_name: str, outdir: Path) -> list[str]:
    lines = []
    acc, sa, sb, bias = bench.operands({"m": m, "n": n, "acc": acc_name}, torch.device("cuda"))
    compiled = bench.compiled_for_case()
    _, code = run_and_get_code(compiled, acc, sa, sb, bias, out_dtype=bench.OUT)
    if m * n == 4096 * 1000:  # the autotuned XBLOCK of one L2-resident case
        (outdir / f"inductor-{acc_name}-{m}x{n}.py").write_text("\n\n".join(code))
    want = compiled(acc, sa, sb, bias, out_dtype=bench.OUT)
    nbytes = m * n * (acc.element_size() + 2)
    res = {}
    res["torch.compile"] = timing.bench_graph(lambda: compiled(acc, sa, sb, bias, out_dtype=bench.OUT))
    res["tritonbits"] = timing.bench_graph(lambda: tritonbits.dequant_bias(acc, sa, sb, bias, out_dtype=bench.OUT))
    strides = db.validate(acc, sa, sb, bias, bench.OUT, None)
    for cfg in tune.candidate_configs(m):

        def alloc_launch(cfg=cfg):
            out = torch.empty((m, n), dtype=bench.OUT, device="cuda")
            db.launch(acc, sa, sb, bias, out, *strides, config=cfg)
            return out

        res[str(cfg)] = timing.bench_graph(alloc_launch)
    total = m * n
    for block, warps in ((512, 4), (1024, 4), (1024, 8), (2048, 8), (4096, 8)):
        for idx64, evict in ((True, ""), (False, ""), (False, "evict_first")):

            def flat(block=block, warps=warps, idx64=idx64, evict=evict):
                out = torch.empty((m, n), dtype=bench.OUT, device="cuda")
                grid = (triton.cdiv(total, block),)
                _flat_const_n[grid](acc, sa, sb, bias, out, total, N=n, BLOCK=block, IDX64=idx64,
                                    EVEN=total % block == 0, ACC_EVICT=evict, num_warps=warps)  # fmt: skip
                return out

            got = flat()
            ok = torch.equal(got, want)
            label = f"flat {block}/{warps} {'i64' if idx64 else 'i32'} {evict or 'no-hint'}"
            res[label + ("" if ok else " DIFFERS")] = timing.bench_graph(flat)
    comp = res["torch.compile"]
    lines.append(f"== {acc_name} M={m} N={n}: compile {1e3 * comp:.2f} us "
                 f"({timing.gbps(nbytes, comp):.0f} GB/s)")  # fmt: skip
    for k, v in sorted(res.items(), key=lambda kv: kv[1])[:14]:
        lines.append(f"   {k:36s} {1e3 * v:9.2f} us  x compile {comp / v:.3f}")
    return lines


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Sweep kernel configs on the present GPU.

  python -m tritonbits_harness.tune --gpu h100                  dequant_bias: rewrite its config table
  python -m tritonbits_harness.tune --gpu h100 --op dequantize_4bit   print the dequantize variant sweep

dequant_bias configs are timed with CUDA graphs (launch gaps removed) on every (acc dtype, M bucket,
N bucket) of the benchmark matrix and the fastest is written into
packages/kernels/src/tritonbits/configs/dequant_bias.json under the GPU family. Nothing is tuned at call time.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from . import gpus, timing
from .bench.runner import progress_bar

BLOCK_MS = (1, 2, 4, 8, 16, 32, 64)
BLOCK_NS = (128, 256, 512)
WARPS = (4, 8)
TABLE = Path(__file__).resolve().parents[3] / "kernels" / "src" / "tritonbits" / "configs" / "dequant_bias.json"


def candidate_configs(m: int) -> list[tuple[int, int, int]]:
    out = []
    for bm in BLOCK_MS:
        if bm > max(m, 1) * 2:
            continue
        for bn in BLOCK_NS:
            if not 1024 <= bm * bn <= 16384:
                continue
            out += [(bm, bn, w) for w in WARPS]
    return out


def tune_dequant_bias(family: str, console: Console, rep_ms: int) -> dict:
    import tritonbits  # noqa: F401  (registers the op)
    from tritonbits.ops import dequant_bias as db

    from .bench import dequant_bias as bench

    device = torch.device("cuda")
    keys: dict[tuple[str, int, int], tuple[int, int]] = {}
    for acc in bench.ACC:
        for n in bench.NS:
            for m in bench.MS:
                keys.setdefault((acc, db.bucket(m), db.bucket(n)), (m, n))
    results: dict[str, dict[str, list[int]]] = {}
    with progress_bar(console) as progress:
        task = progress.add_task(f"dequant_bias configs on {family}", total=len(keys))
        for (acc, mb, nb), (m, n) in keys.items():
            a, sa, sb, bias = bench.operands({"m": m, "n": n, "acc": acc}, device)
            out = torch.empty(a.shape, dtype=bench.OUT, device=device)
            strides = db.validate(a, sa, sb, bias, bench.OUT, out)
            best: tuple[float, tuple[int, int, int]] | None = None
            for cfg in candidate_configs(m):
                fn = functools.partial(db.launch, a, sa, sb, bias, out, *strides, config=cfg)
                ms = timing.bench_graph(fn, rep=rep_ms)
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            assert best is not None, f"no candidate config for M={m}"
            results.setdefault(acc, {})[f"{mb}x{nb}"] = list(best[1])
            progress.advance(task)
    return results


DEQUANTIZE_SHAPES = ((4096, 1024), (8192, 2048), (14336, 4096), (4096, 14336), (28672, 8192))


def dequantize_variants() -> list[tuple[str, dict[str, int | bool]]]:
    """(label, launch overrides): the defaults with and without eviction hints, then tile/warp choices."""
    out: list[tuple[str, dict[str, int | bool]]] = [("default", {}), ("default, no eviction hints", {"evict": False})]
    for b, w in ((512, 1), (1024, 1), (1024, 2), (2048, 2), (2048, 4), (4096, 4)):
        out.append((f"{b}B/{w}w", {"bytes_per_program": b, "num_warps": w}))
        for regs in (32, 40):
            out.append((f"{b}B/{w}w, maxnreg {regs}", {"bytes_per_program": b, "num_warps": w, "maxnreg": regs}))
    return out


def tune_dequantize_4bit(console: Console, rep_ms: int, dtype: torch.dtype = torch.bfloat16) -> None:
    """Print GB/s and % of the expand-only pattern (same run) of every variant on the benchmark shapes."""
    import bitsandbytes.functional as F

    from tritonbits.ops import dequantize_4bit as dq
    from tritonbits.quant_state import prepare

    from . import patterns

    variants = dequantize_variants()
    table = Table(title=f"dequantize_4bit variants: GB/s (CUDA-graph median) and % of the expand-only pattern, "
                        f"nf4 nested bs64 {dtype}")  # fmt: skip
    table.add_column("variant")
    results: dict[str, list[str]] = {label: [] for label in ["expand-only pattern", *(v[0] for v in variants)]}
    with progress_bar(console) as progress:
        task = progress.add_task("dequantize_4bit variants", total=len(DEQUANTIZE_SHAPES) * (len(variants) + 1))
        for rows, cols in DEQUANTIZE_SHAPES:
            table.add_column(f"{rows}x{cols}", justify="right")
            w_ = torch.randn(rows, cols, device="cuda", dtype=dtype)
            q, state = F.quantize_4bit(w_, blocksize=64, quant_type="nf4", compress_statistics=True)
            weight = prepare(q, state)
            want = F.dequantize_4bit(q, state)
            out = torch.empty(rows, cols, device="cuda", dtype=dtype)
            n = rows * cols
            nbytes = n // 2 + n // 64 + 4 * -(-n // (64 * 256)) + n * dtype.itemsize
            expand = functools.partial(patterns.expand, q.view(-1), out.view(-1))
            pattern = timing.gbps(nbytes, timing.bench_graph(expand, rep=rep_ms))
            results["expand-only pattern"].append(f"{pattern:.0f}")
            progress.advance(task)
            for label, overrides in variants:
                fn = functools.partial(dq.launch_weight, weight, out, **overrides)
                out.fill_(float("nan"))
                fn()
                if not torch.equal(out, want):
                    raise AssertionError(f"variant {label} differs from bnb at {rows}x{cols}")
                gb = timing.gbps(nbytes, timing.bench_graph(fn, rep=rep_ms))
                results[label].append(f"{gb:.0f} ({100 * gb / pattern:.1f}%)")
                progress.advance(task)
    for label, cells in results.items():
        table.add_row(label, *cells)
    console.print(table)
    for key, kernel in dq._launcher.compiled.items():  # registers of every specialization the sweep compiled
        console.print(f"compiled {key[2]} {dict(key[3])}: {kernel.n_regs} registers, {kernel.n_spills} spills")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tritonbits-tune", description=__doc__)
    parser.add_argument("--gpu", required=True, choices=sorted(gpus.PROFILES))
    parser.add_argument("--op", default="dequant_bias", choices=("dequant_bias", "dequantize_4bit"))
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"), help="dequantize_4bit output")
    parser.add_argument("--any-gpu", action="store_true")
    parser.add_argument("--rep-ms", type=int, default=10)
    parser.add_argument("--write", default=str(TABLE), help="config table to update (dequant_bias)")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 140)
    device = gpus.current_device()
    if device is None:
        console.print("[red]tune needs a CUDA device")
        return 2
    real = device.profile.name if device.profile else device.name
    if real != args.gpu and not args.any_gpu:
        console.print(f"[red]this machine has a {device.name}, not a {args.gpu} (pass --any-gpu to tune anyway)")
        return 2
    if args.op == "dequantize_4bit":
        tune_dequantize_4bit(console, args.rep_ms, {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype])
        return 0
    results = tune_dequant_bias(args.gpu, console, args.rep_ms)
    path = Path(args.write)
    table = json.loads(path.read_text()) if path.exists() else {}
    table[args.gpu] = results
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    console.print(f"wrote {sum(len(v) for v in results.values())} configs for {args.gpu} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

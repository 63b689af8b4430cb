"""Benchmarks of tritonbits.dequant_bias against the seed's eager versions and torch.compile, and its
section of docs/benchmarks.md."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import torch

import tritonbits
from tritonbits_reference.dequant_bias import dequant_bias_eager, dequant_bias_expression

from .. import patterns, report
from .registry import Benchmark, SectionInput, register

# BitNet b1.58 2B layers, Llama-3-8B, then an odd N and the Llama-2-7B / Mistral / Llama-3-70B MLP widths
NS = (2560, 3840, 13824, 4096, 14336, 1000, 6144, 11008, 28672)
MS = (1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)
ACC = {"int32": torch.int32, "bf16": torch.bfloat16, "fp32": torch.float32}
OUT = torch.bfloat16
QUICK_MS = (1, 128, 4096, 65536)
QUICK_NS = (1000, 2560, 14336, 28672)


def bytes_model(case: dict) -> int:
    """acc read + bf16 out written + fp32 scales + bf16 bias."""
    m, n = case["m"], case["n"]
    return m * n * (ACC[case["acc"]].itemsize + OUT.itemsize) + 4 * m + 4 * n + 2 * n


def cases(cpu: bool) -> list[dict]:
    if cpu:
        return [{"m": m, "n": n, "acc": a} for m, n in ((1, 64), (16, 96)) for a in ACC]
    return [{"m": m, "n": n, "acc": a} for a in ACC for n in NS for m in MS]


def quick(case: dict) -> bool:
    return case["m"] in QUICK_MS and case["n"] in QUICK_NS


def compiled_for_case():
    """torch.compile of the one-line expression as a CUDA-graph user gets it: static shapes (dynamic=False)
    and compiled for this case alone. Dynamo's caches are reset first, so no case inherits another's code
    and no case falls back to eager by hitting the recompile limit after the first few shapes."""
    torch._dynamo.reset()
    return torch.compile(dequant_bias_expression, dynamic=False)


def operands(case: dict, device: torch.device):
    m, n, dtype = case["m"], case["n"], ACC[case["acc"]]
    if dtype == torch.int32:
        acc = torch.randint(-(2**20), 2**20, (m, n), dtype=dtype, device=device)
    else:
        acc = torch.randn(m, n, device=device).to(dtype)
    sa = torch.rand(m, 1, device=device) + 0.5
    sb = torch.rand(1, n, device=device) + 0.5
    bias = torch.randn(n, device=device).to(OUT)
    return acc, sa, sb, bias


def setup(case: dict, device: torch.device) -> dict:
    acc, sa, sb, bias = operands(case, device)
    pattern_out = torch.empty(acc.shape, dtype=OUT, device=device)
    thunks = {
        "tritonbits": lambda: tritonbits.dequant_bias(acc, sa, sb, bias, out_dtype=OUT),
        "pattern": lambda: patterns.cast_copy(acc, pattern_out),
        "eager-5op": lambda: dequant_bias_eager(acc, sa, sb, bias, out_dtype=OUT),
        "eager-expr": lambda: dequant_bias_expression(acc, sa, sb, bias, out_dtype=OUT),
    }
    if device.type == "cuda":
        compiled = compiled_for_case()
        compiled(acc, sa, sb, bias, out_dtype=OUT)  # compile now, not inside the first timing
        thunks["torch.compile"] = lambda: compiled(acc, sa, sb, bias, out_dtype=OUT)
    return thunks


def section(inp: SectionInput) -> list[str]:
    """Per timing mode and acc dtype, an M x N grid of GB/s and speed-ups; a summary; one plot per acc."""
    rec, rows = inp.record, inp.rows
    plots = []
    for acc in sorted({r["params"]["acc"] for r in rows}):
        png = inp.plot_dir / f"dequant_bias-{inp.slug}-{acc}.png"
        plot(rows, rec["copy_gbps"], png, inp.device, acc)
        plots.append(f"plots/{png.name}")
    meta = rec["benchmarks"]["dequant_bias"]
    out = [f"### dequant_bias — {meta['description']}", "", f"Run: {report.env_line(rec)}. "
           f"Device-to-device copy in the same run: {rec['copy_gbps']:.0f} GB/s.", ""]  # fmt: skip
    for mode in ("graph", "launch"):
        cases = report.by_case(rows, mode)
        accs = sorted({c["tritonbits"]["params"]["acc"] for c in cases.values()})
        ns = sorted({c["tritonbits"]["params"]["n"] for c in cases.values()})
        ms = sorted({c["tritonbits"]["params"]["m"] for c in cases.values()})
        out += [f"**{report.MODES[mode]}** — each cell: tritonbits GB/s (% of copy) · speed-up over torch.compile · "
                "over the 5-op eager version", ""]  # fmt: skip
        index = {(c["tritonbits"]["params"]["acc"], c["tritonbits"]["params"]["n"], c["tritonbits"]["params"]["m"]): c
                 for c in cases.values()}  # fmt: skip
        for acc in accs:
            body = []
            for m in ms:
                cells = []
                for n in ns:
                    c = index.get((acc, n, m))
                    if c is None:
                        cells.append("—")
                        continue
                    t = c["tritonbits"]
                    comp = c["torch.compile"]["ms"] / t["ms"] if "torch.compile" in c else float("nan")
                    eager = c["eager-5op"]["ms"] / t["ms"]
                    cells.append(f"{t['gbps']:.0f} ({t['pct_copy']:.0f}%) · {comp:.2f}× · {eager:.1f}×")
                body.append([str(m), *cells])
            out += [f"acc = {acc}", "", report.table(["M \\ N", *map(str, ns)], body), ""]
        out += _summary(cases, mode)
    out += [f"![dequant_bias GB/s]({p})" for p in plots] + [""]
    return out


def _summary(cases: dict, mode: str) -> list[str]:
    vs_compile = [c["torch.compile"]["ms"] / c["tritonbits"]["ms"] for c in cases.values() if "torch.compile" in c]
    if not vs_compile:
        return []
    big = [c["tritonbits"]["pct_copy"] for c in cases.values()
           if c["tritonbits"]["params"]["m"] * c["tritonbits"]["params"]["n"] >= 16 << 20]  # fmt: skip
    slower = sum(1 for v in vs_compile if v < 1.0)
    lines = [f"Summary ({mode}): speed-up over torch.compile min {min(vs_compile):.2f}×, median "
             f"{statistics.median(vs_compile):.2f}×, slower at {slower} of {len(vs_compile)} points"]  # fmt: skip
    if big:
        lines[0] += f"; % of copy at M·N ≥ 16M: min {min(big):.1f}, median {statistics.median(big):.1f}"
    return [lines[0] + ".", ""]


def plot(rows: list[dict], copy_gbps: float, path: Path, device: str, acc: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["params"]["n"] for r in rows})
    ncols = min(len(ns), 5)
    nrows = -(-len(ns) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4 * ncols, 4 * nrows), sharey=True, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(ns) :]:
        ax.set_visible(False)
    axes = axes[: len(ns)]
    for ax, n in zip(axes, ns, strict=True):
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in rows:
            if r["mode"] == "graph" and r["params"]["n"] == n and r["params"]["acc"] == acc:
                series[r["provider"]].append((r["params"]["m"], r["gbps"]))
        for provider, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=provider,
                    linewidth=2.5 if provider == "tritonbits" else 1.2)  # fmt: skip
        ax.axhline(copy_gbps, color="black", linestyle="--", label="device copy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M")
        ax.set_title(f"N={n}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GB/s")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"dequant_bias, acc {acc} -> bf16, CUDA graph — {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


register(Benchmark(
    name="dequant_bias",
    kernel="dequant_bias",
    description="out[M,N] bf16 = acc * scale_a[M,1] * scale_b[1,N] + bias[N] (bf16)",
    cases=cases,
    bytes_model=bytes_model,
    setup=setup,
    baselines=("torch.compile", "eager-5op", "eager-expr"),
    quick=quick,
    section=section,
))  # fmt: skip

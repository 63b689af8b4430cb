"""Benchmarks of tritonbits.dequantize_4bit: GB/s sweep, the Unsloth-puzzle wall time, and compiled vs
eager MLP time. Baselines come from tritonbits_reference (the same code the tests judge with). The GB/s
sweep renders its own section of docs/benchmarks.md; the other two use the report's generic one."""

from __future__ import annotations

import functools
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

import tritonbits
from tritonbits_reference import baselines

from .. import patterns, report
from .registry import Benchmark, SectionInput, register

SHAPES = [(8192, 2048), (4096, 1024), (14336, 4096), (4096, 14336), (28672, 8192)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def bytes_model(case: dict) -> int:
    """n/2 packed bytes + nested absmax (1 byte a block + fp32 per 256 blocks) + n output elements."""
    n = case["rows"] * case["cols"]
    blocks = -(-n // case["blocksize"])
    return n // 2 + blocks + 4 * -(-blocks // 256) + n * DTYPES[case["dtype"]].itemsize


def cases(cpu: bool) -> list[dict]:
    shapes = [(64, 256), (96, 192)] if cpu else SHAPES
    return [{"rows": r, "cols": c, "dtype": d, "quant_type": "nf4", "blocksize": 64}
            for (r, c) in shapes for d in DTYPES]  # fmt: skip


def quantized(case: dict, device: torch.device):
    import bitsandbytes.functional as F

    w = torch.randn(case["rows"], case["cols"], device=device, dtype=DTYPES[case["dtype"]])
    return F.quantize_4bit(w, blocksize=case["blocksize"], quant_type=case["quant_type"], compress_statistics=True)


@functools.cache
def _compiled_reference():
    return torch.compile(baselines.torch_dequantize_4bit, dynamic=False)


def setup(case: dict, device: torch.device) -> dict:
    import bitsandbytes.functional as F

    q, state = quantized(case, device)
    n = math.prod(state.shape)
    expand_out = torch.empty(n, dtype=state.dtype, device=device)
    fields = baselines.torch_fields(q, state, device)
    thunks = {
        "tritonbits": lambda: tritonbits.dequantize_4bit(q, state),
        "pattern": lambda: patterns.expand(q.view(-1), expand_out),
    }
    if device.type == "cuda":
        got = tritonbits.dequantize_4bit(q, state)
        if not torch.equal(got, F.dequantize_4bit(q, state)):
            raise AssertionError(f"tritonbits != bnb on {case}: benchmark refuses to time a wrong kernel")
        compiled = _compiled_reference()
        thunks.update({
            "bnb": lambda: F.dequantize_4bit(q, state),
            "unsloth": lambda: baselines.unsloth_fast_dequantize(q, state),
            "bnb-triton": lambda: baselines.bnb_triton_dequantize_4bit(q, state),
            "torch.compile": lambda: compiled(**fields),
        })  # fmt: skip
    else:
        thunks["torch-eager"] = lambda: baselines.torch_dequantize_4bit(**fields)
    return thunks


def section(inp: SectionInput) -> list[str]:
    """GB/s tables per timing mode (every provider, % of the pattern and of copy, speed-ups) and a plot."""
    rec, rows = inp.record, inp.rows
    png = inp.plot_dir / f"dequantize_4bit-{inp.slug}.png"
    plot(rows, rec["copy_gbps"], png, inp.device)
    meta = rec["benchmarks"]["dequantize_4bit"]
    out = [f"### dequantize_4bit — {meta['description']}", "", f"Run: {report.env_line(rec)}. "
           f"Device-to-device copy in the same run: {rec['copy_gbps']:.0f} GB/s.", ""]  # fmt: skip
    providers = ["tritonbits", "pattern", "bnb", "unsloth", "bnb-triton", "torch.compile"]
    for mode in ("graph", "launch"):
        out += [f"**{report.MODES[mode]}** — GB/s; tritonbits also as % of the expand-only pattern and of copy; "
                "last columns: speed-up of tritonbits over each baseline.", ""]  # fmt: skip
        header = ["shape", "dtype", *providers, "% pattern", "% copy", "× bnb", "× unsloth", "× torch.compile"]
        body = []
        for prov in report.by_case(rows, mode).values():
            p = prov["tritonbits"]["params"]
            ours = prov["tritonbits"]
            cells = [f"{prov[x]['gbps']:.0f}" if x in prov else "—" for x in providers]
            ratios = [f"{prov[b]['ms'] / ours['ms']:.2f}" if b in prov else "—"
                      for b in ("bnb", "unsloth", "torch.compile")]  # fmt: skip
            body.append([f"{p['rows']}×{p['cols']}", p["dtype"], *cells, f"{ours.get('pct_pattern', 0):.1f}",
                         f"{ours.get('pct_copy', 0):.1f}", *ratios])  # fmt: skip
        out += [report.table(header, body), ""]
    out += [f"![dequantize_4bit GB/s](plots/{png.name})", ""]
    return out


def plot(rows: list[dict], copy_gbps: float, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, dtype in zip(axes, ("fp16", "bf16"), strict=True):
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in rows:
            if r["mode"] == "graph" and r["params"]["dtype"] == dtype:
                series[r["provider"]].append((r["params"]["rows"] * r["params"]["cols"], r["gbps"]))
        for provider, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider,
                    linewidth=2.5 if provider == "tritonbits" else 1.2)  # fmt: skip
        ax.axhline(copy_gbps, color="black", linestyle="--", label="device copy")
        ax.set_xscale("log")
        ax.set_xlabel("weight elements")
        ax.set_title(f"dequantize_4bit {dtype}, CUDA graph")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GB/s")
    axes[1].legend(fontsize=8)
    fig.suptitle(device)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


register(Benchmark(
    name="dequantize_4bit",
    kernel="dequantize_4bit",
    description="NF4, nested absmax, blocksize 64: GB/s = (n/2 + absmax + output bytes) / time",
    cases=cases,
    bytes_model=bytes_model,
    setup=setup,
    baselines=("bnb", "unsloth", "bnb-triton", "torch.compile"),
    section=section,
))  # fmt: skip


# --- Unsloth puzzle: three Linear4bit weights, dequantize each with a sync after it, 1000 iterations ---

PUZZLE = [(2048, 8192, "fp16"), (1024, 4096, "bf16"), (4096, 14336, "bf16")]


def puzzle_layers(hd: int, m: int, dtype: torch.dtype, device: torch.device):
    from tritonbits_reference import bnb as RB

    shapes = [(hd, m), (hd, m), (m, hd)]  # gate, up, down
    return [RB.linear4bit(i, o, dtype=dtype, device=device).weight for i, o in shapes]


def run_puzzle(bench: Benchmark, device: torch.device, cpu: bool, progress) -> list[dict]:
    import bitsandbytes.functional as F

    iterations = 5 if cpu else 1000
    configs = [(64, 128, "bf16")] if cpu else PUZZLE
    rows = []
    for hd, m, dname in configs:
        weights = puzzle_layers(hd, m, DTYPES[dname], device)
        providers = {"tritonbits": lambda w: tritonbits.dequantize_4bit(w.data, w.quant_state)}
        if device.type == "cuda":
            providers["unsloth"] = lambda w: baselines.unsloth_fast_dequantize(w.data, w.quant_state)
            providers["bnb"] = lambda w: F.dequantize_4bit(w.data, w.quant_state)
        for name, fn in providers.items():
            for w in weights:  # warm up (compile, allocate)
                fn(w)
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            sync()
            start = time.perf_counter()
            for _ in range(iterations):
                for w in weights:
                    fn(w)
                    sync()
            seconds = time.perf_counter() - start
            rows.append({"benchmark": bench.name, "case": f"hd={hd} m={m} {dname}", "provider": name,
                         "mode": "wall", "ms": seconds * 1e3, "iterations": iterations,
                         "params": {"hd": hd, "m": m, "dtype": dname}})  # fmt: skip
            progress()
    return rows


register(Benchmark(
    name="unsloth_puzzle",
    kernel="dequantize_4bit",
    description="wall time of 1000 x (dequantize 3 Linear4bit weights, synchronize after each)",
    cases=lambda cpu: [{"config": c} for c in ([(64, 128, "bf16")] if cpu else PUZZLE)],
    bytes_model=None,
    setup=lambda case, device: {},
    baselines=("unsloth", "bnb"),
    modes=("wall",),
    runner=run_puzzle,
))  # fmt: skip


# --- compiled vs eager: an MLP forward that dequantizes three bnb layers ------------------------------


def mlp_setup(case: dict, device: torch.device) -> dict:
    weights = puzzle_layers(case["hd"], case["m"], DTYPES[case["dtype"]], device)
    x = torch.randn(case["tokens"], case["hd"], dtype=DTYPES[case["dtype"]], device=device)
    packed = [(w.data, w.quant_state) for w in weights]

    def mlp(x):
        gate = x @ tritonbits.dequantize_4bit(*packed[0]).t()
        up = x @ tritonbits.dequantize_4bit(*packed[1]).t()
        return (torch.nn.functional.silu(gate) * up) @ tritonbits.dequantize_4bit(*packed[2]).t()

    def weights_only():
        return [tritonbits.dequantize_4bit(*p) for p in packed]

    thunks = {"eager": lambda: mlp(x)}
    if device.type == "cuda":
        torch._dynamo.reset()
        compiled = torch.compile(mlp, fullgraph=True)
        # the dequantized weights must be bit-exact under compile; the MLP output only close, since
        # Inductor fuses silu * up into one kernel with its own rounding
        for got, want in zip(torch.compile(weights_only, fullgraph=True)(), weights_only(), strict=True):
            if not torch.equal(got, want):
                raise AssertionError("compiled dequantize_4bit differs from eager")
        want = mlp(x)
        torch.testing.assert_close(compiled(x), want, rtol=5e-2, atol=5e-2 * want.abs().max().item())
        thunks["compile"] = lambda: compiled(x)
    return thunks


register(
    Benchmark(
        name="mlp_compile",
        kernel="dequantize_4bit",
        description="MLP forward (3 bnb NF4 layers dequantized + matmuls, 16 tokens): eager vs torch.compile",
        cases=lambda cpu: [
            {"hd": hd, "m": m, "dtype": d, "tokens": 16} for hd, m, d in ([(64, 128, "bf16")] if cpu else PUZZLE)
        ],
        bytes_model=None,
        setup=mlp_setup,
        baselines=("compile",),
        subject="eager",
        modes=("launch", "graph"),
    )
)

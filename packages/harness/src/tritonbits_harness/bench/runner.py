"""Run registered benchmarks: time every provider of every case in every mode, with the rooflines
measured in the same run, and summarise the tritonbits row against each baseline."""

from __future__ import annotations

import re
import statistics

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .. import timing
from .registry import Benchmark, case_label


def time_thunk(fn, mode: str, rep_ms: int) -> timing.Quantiles:
    """p20/p50/p80 milliseconds of fn in one timing mode ("launch", "graph" or "wall")."""
    if mode == "launch":
        return timing.bench_quantiles(fn, warmup=max(rep_ms // 4, 5), rep=rep_ms)
    if mode == "graph":
        return timing.bench_graph_quantiles(fn, rep=rep_ms)
    if mode == "wall":
        return timing.wall_quantiles(fn)
    raise ValueError(f"unknown timing mode {mode!r}; choose launch, graph or wall")


def select_cases(bench: Benchmark, *, cpu: bool, quick: bool, shard: tuple[int, int] = (1, 1)) -> list[dict]:
    """The benchmark's cases; with `quick`, the GPU cases its `quick` keeps (CPU cases are tiny already); with
    `shard` (i, n), every n-th of those from the i-th (1-based): n runs with i = 1..n cover them once."""
    cases = bench.cases(cpu)
    if quick and not cpu and bench.quick is not None:
        cases = [c for c in cases if bench.quick(c)]
        if not cases:
            raise ValueError(f"benchmark {bench.name!r}: its quick filter keeps none of its cases")
    i, n = shard
    return cases[i - 1 :: n]


def parse_shard(text: str) -> tuple[int, int]:
    """ "I/N" (1 <= I <= N) -> (I, N); anything else is a ValueError naming the argument."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if m is None or not 1 <= int(m[1]) <= int(m[2]):
        raise ValueError(f"--shard must be I/N with 1 <= I <= N (e.g. 2/3), got {text!r}")
    return int(m[1]), int(m[2])


def run_benchmark(bench: Benchmark, device: torch.device, *, cpu: bool, rep_ms: int, copy_gbps: float | None,
                  progress: Progress, quick: bool = False, notes: list[str] | None = None,
                  shard: tuple[int, int] = (1, 1)) -> list[dict]:  # fmt: skip
    """Rows of every provider x mode x case. A BASELINE that cannot be captured in a CUDA graph (e.g. it copies
    from the host on every call) has no graph row; the reason goes to `notes`. The subject never gets a pass."""
    cases = select_cases(bench, cpu=cpu, quick=quick, shard=shard)
    task = progress.add_task(bench.name, total=len(cases))
    if bench.runner is not None:
        custom: list[dict] = bench.runner(bench, device, cpu, lambda: None)
        progress.update(task, completed=len(cases))
        return custom
    modes = ("wall",) if cpu else bench.modes
    rows: list[dict] = []
    for case in cases:
        thunks = bench.setup(case, device)
        nbytes = bench.bytes_model(case) if bench.bytes_model else None
        pattern_gbps: dict[str, float] = {}
        ordered = sorted(thunks.items(), key=lambda kv: kv[0] != "pattern")  # the roofline first
        for provider, fn in ordered:
            for mode in modes:
                try:
                    q = time_thunk(fn, mode, rep_ms)
                except RuntimeError as exc:
                    if mode != "graph" or provider == bench.subject or notes is None:
                        raise
                    notes.append(f"{bench.name} [{case_label(case)}] {provider}: no CUDA-graph timing ({exc})")
                    torch.cuda.synchronize()
                    continue
                ms = q["p50"]  # "ms" is the median, which the report reads
                row = {"benchmark": bench.name, "case": case_label(case), "params": case, "provider": provider,
                       "mode": mode, "ms": ms, **q}  # fmt: skip
                if nbytes is not None:
                    gbps = timing.gbps(nbytes, ms)
                    row.update(bytes=nbytes, gbps=gbps)
                    if copy_gbps:
                        row["pct_copy"] = 100 * gbps / copy_gbps
                    if provider == "pattern":
                        pattern_gbps[mode] = gbps
                    if mode in pattern_gbps:
                        row["pct_pattern"] = 100 * gbps / pattern_gbps[mode]
                rows.append(row)
        del thunks
        if device.type == "cuda":
            torch.cuda.empty_cache()
        progress.advance(task)
    return rows


def ratios(rows: list[dict], bench: Benchmark) -> list[dict]:
    """Per case and mode: baseline time / subject time (> 1 means the subject is faster)."""
    ours = {(r["case"], r["mode"]): r["ms"] for r in rows if r["provider"] == bench.subject}
    out = []
    for r in rows:
        if r["provider"] in bench.baselines and (r["case"], r["mode"]) in ours:
            out.append({"case": r["case"], "mode": r["mode"], "baseline": r["provider"],
                        "speedup": r["ms"] / ours[r["case"], r["mode"]]})  # fmt: skip
    return out


def summary_table(name: str, rows: list[dict], bench: Benchmark, meaningless: bool) -> Table:
    title = f"{name}: baseline time / {bench.subject} time (> 1: {bench.subject} is faster)"
    if meaningless:
        title += " — CPU interpreter: these numbers mean NOTHING"
    table = Table(title=title)
    for col in ("baseline", "mode", "min", "median", "max", "cases"):
        table.add_column(col)
    groups: dict[tuple[str, str], list[float]] = {}
    for r in ratios(rows, bench):
        groups.setdefault((r["baseline"], r["mode"]), []).append(r["speedup"])
    for (baseline, mode), values in sorted(groups.items()):
        table.add_row(baseline, mode, f"{min(values):.2f}x", f"{statistics.median(values):.2f}x",
                      f"{max(values):.2f}x", str(len(values)))  # fmt: skip
    ours = [r for r in rows if r["provider"] == bench.subject and "pct_pattern" in r]
    if ours:
        table.caption = (f"tritonbits % of pattern roofline: min {min(r['pct_pattern'] for r in ours):.1f}%, "
                         f"median {statistics.median(r['pct_pattern'] for r in ours):.1f}%")  # fmt: skip
    return table


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console)  # fmt: skip

"""Render docs/benchmarks.md and PNG plots from the run records in docs/gpu-runs/ (matplotlib).

  python -m tritonbits_harness.report --records docs/gpu-runs --out docs

For each device, the latest benchmark rows of each benchmark (a run may hold a subset of them) and the
latest test record of each session are shown. Nothing is typed in by hand: every number comes from a record.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from . import records

MODES = {"graph": "CUDA-graph replay (launch gaps removed)", "launch": "do_bench (launch included)",
         "wall": "wall clock"}  # fmt: skip


def latest_by_device(recs: list[dict]) -> dict[str, dict]:
    """device -> {"bench": {benchmark: (record, rows)}, "tests": {session: record}, "runs": [record]}.

    A benchmark shows the newest of its most complete runs (a --quick run never hides a full sweep);
    every other run is listed with its summary."""
    out: dict[str, dict] = defaultdict(lambda: {"bench": {}, "tests": {}, "runs": []})
    for rec in sorted(recs, key=lambda r: r["environment"]["date"]):
        dev = rec["environment"]["device"]
        if rec.get("meaningless"):
            continue
        if rec["kind"] == "bench":
            out[dev]["runs"].append(rec)
            for name in rec.get("benchmarks", {}):
                rows = [r for r in rec["rows"] if r["benchmark"] == name]
                best = out[dev]["bench"].get(name)
                if rows and (best is None or len(rows) >= len(best[1])):
                    out[dev]["bench"][name] = (rec, rows)
        elif rec["kind"] == "tests":
            out[dev]["tests"][rec["name"]] = rec
    return out


def runs_section(runs: list[dict], shown: dict) -> list[str]:
    """Every bench run of the device, with the tritonbits speed-up over each baseline (CUDA graph)."""
    body = []
    for rec in runs:
        for name in rec.get("benchmarks", {}):
            rows = [r for r in rec["rows"] if r["benchmark"] == name]
            if not rows:
                continue
            subject = "eager" if name == "mlp_compile" else "tritonbits"
            mode = "graph" if any(r["mode"] == "graph" for r in rows) else rows[0]["mode"]
            cases = _by_case(rows, mode)
            parts = []
            for base in rec["benchmarks"][name]["baselines"]:
                vals = [c[base]["ms"] / c[subject]["ms"] for c in cases.values() if base in c and subject in c]
                if vals:
                    parts.append(f"{base} {min(vals):.2f}–{max(vals):.2f}×")
            used = "shown above" if shown.get(name, (None,))[0] is rec else "—"
            body.append([rec["environment"]["date"], rec["environment"]["git_sha"], name, str(len(cases)), mode,
                         "; ".join(parts), used])  # fmt: skip
    header = ["date", "git", "benchmark", "cases", "mode", "baseline time / subject time (min–max)", "tables"]
    return ["### All benchmark runs", "", _table(header, body), ""]


def _env_line(rec: dict) -> str:
    e = rec["environment"]
    return (f"{e['device']} (sm{''.join(map(str, e['capability'] or []))}, driver {e['driver']}), torch {e['torch']}, "
            f"triton {e['triton']}, bitsandbytes {e['bitsandbytes']}, git {e['git_sha']}, {e['date']}")  # fmt: skip


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _by_case(rows: list[dict], mode: str) -> dict[str, dict[str, dict]]:
    cases: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r["mode"] == mode:
            cases[r["case"]][r["provider"]] = r
    return cases


def dequantize_section(rec: dict, rows: list[dict], plot: str | None) -> list[str]:
    meta = rec["benchmarks"]["dequantize_4bit"]
    out = [f"### dequantize_4bit — {meta['description']}", "", f"Run: {_env_line(rec)}. "
           f"Device-to-device copy in the same run: {rec['copy_gbps']:.0f} GB/s.", ""]  # fmt: skip
    providers = ["tritonbits", "pattern", "bnb", "unsloth", "bnb-triton", "torch.compile"]
    for mode in ("graph", "launch"):
        out += [f"**{MODES[mode]}** — GB/s; tritonbits also as % of the expand-only pattern and of copy; "
                "last columns: speed-up of tritonbits over each baseline.", ""]  # fmt: skip
        header = ["shape", "dtype", *providers, "% pattern", "% copy", "× bnb", "× unsloth", "× torch.compile"]
        body = []
        for prov in _by_case(rows, mode).values():
            p = prov["tritonbits"]["params"]
            ours = prov["tritonbits"]
            cells = [f"{prov[x]['gbps']:.0f}" if x in prov else "—" for x in providers]
            ratios = [f"{prov[b]['ms'] / ours['ms']:.2f}" if b in prov else "—"
                      for b in ("bnb", "unsloth", "torch.compile")]  # fmt: skip
            body.append([f"{p['rows']}×{p['cols']}", p["dtype"], *cells, f"{ours.get('pct_pattern', 0):.1f}",
                         f"{ours.get('pct_copy', 0):.1f}", *ratios])  # fmt: skip
        out += [_table(header, body), ""]
    if plot:
        out += [f"![dequantize_4bit GB/s]({plot})", ""]
    return out


def dequant_bias_section(rec: dict, rows: list[dict], plots: list[str]) -> list[str]:
    meta = rec["benchmarks"]["dequant_bias"]
    out = [f"### dequant_bias — {meta['description']}", "", f"Run: {_env_line(rec)}. "
           f"Device-to-device copy in the same run: {rec['copy_gbps']:.0f} GB/s.", ""]  # fmt: skip
    for mode in ("graph", "launch"):
        cases = _by_case(rows, mode)
        accs = sorted({c["tritonbits"]["params"]["acc"] for c in cases.values()})
        ns = sorted({c["tritonbits"]["params"]["n"] for c in cases.values()})
        ms = sorted({c["tritonbits"]["params"]["m"] for c in cases.values()})
        out += [f"**{MODES[mode]}** — each cell: tritonbits GB/s (% of copy) · speed-up over torch.compile · "
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
            out += [f"acc = {acc}", "", _table(["M \\ N", *map(str, ns)], body), ""]
        out += _dequant_bias_summary(cases, mode)
    out += [f"![dequant_bias GB/s]({p})" for p in plots] + [""]
    return out


def _dequant_bias_summary(cases: dict, mode: str) -> list[str]:
    vs_compile = [c["torch.compile"]["ms"] / c["tritonbits"]["ms"] for c in cases.values() if "torch.compile" in c]
    big = [c["tritonbits"]["pct_copy"] for c in cases.values()
           if c["tritonbits"]["params"]["m"] * c["tritonbits"]["params"]["n"] >= 16 << 20]  # fmt: skip
    slower = sum(1 for v in vs_compile if v < 1.0)
    lines = [f"Summary ({mode}): speed-up over torch.compile min {min(vs_compile):.2f}×, median "
             f"{statistics.median(vs_compile):.2f}×, slower at {slower} of {len(vs_compile)} points"]  # fmt: skip
    if big:
        lines[0] += f"; % of copy at M·N ≥ 16M: min {min(big):.1f}, median {statistics.median(big):.1f}"
    return [lines[0] + ".", ""]


def simple_section(name: str, rec: dict, rows: list[dict]) -> list[str]:
    meta = rec["benchmarks"][name]
    subject = "tritonbits" if name != "mlp_compile" else "eager"
    out = [f"### {name} — {meta['description']}", "", f"Run: {_env_line(rec)}.", ""]
    for mode in sorted({r["mode"] for r in rows}):
        cases = _by_case(rows, mode)
        providers = sorted({p for c in cases.values() for p in c}, key=lambda p: (p != subject, p))
        header = ["case", *[f"{p} (ms)" for p in providers], *[f"{p} / {subject}" for p in providers[1:]]]
        body = []
        for case, prov in cases.items():
            ref = prov[subject]["ms"]
            body.append([case, *[f"{prov[p]['ms']:.3f}" if p in prov else "—" for p in providers],
                         *[f"{prov[p]['ms'] / ref:.2f}" if p in prov else "—" for p in providers[1:]]])  # fmt: skip
        out += [f"**{MODES[mode]}**", "", _table(header, body), ""]
    return out


def plot_dequantize(rows: list[dict], copy_gbps: float, path: Path, device: str) -> None:
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


def plot_dequant_bias(rows: list[dict], copy_gbps: float, path: Path, device: str, acc: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["params"]["n"] for r in rows})
    fig, axes = plt.subplots(1, len(ns), figsize=(4 * len(ns), 4), sharey=True)
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


def tests_section(tests: dict[str, dict]) -> list[str]:
    if not tests:
        return []
    body = []
    for name, rec in sorted(tests.items()):
        c = rec["counts"]
        body.append([f"test-{name}", str(c.get("passed", 0)), str(c.get("failed", 0)), str(c.get("skipped", 0)),
                     str(c.get("error", 0)), rec["environment"]["git_sha"], rec["environment"]["date"]])  # fmt: skip
    return ["### GPU test sessions", "", _table(["session", "passed", "failed", "skipped", "errors", "git", "date"],
                                                 body), ""]  # fmt: skip


def render(record_dir: str, out_dir: str) -> Path:
    out = Path(out_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    lines = ["# Benchmarks", "", "Rendered by `nox -s report` from the JSON records in docs/gpu-runs/ — do not edit.",
             "Ratios are measured side by side in one run on one GPU; GB/s come from each benchmark's bytes model.",
             ""]  # fmt: skip
    for device, data in sorted(latest_by_device(records.load(record_dir)).items()):
        slug = records.slug(device)
        lines += [f"## {device}", ""]
        lines += tests_section(data["tests"])
        bench = data["bench"]
        if "dequantize_4bit" in bench:
            rec, rows = bench["dequantize_4bit"]
            png = plots / f"dequantize_4bit-{slug}.png"
            plot_dequantize(rows, rec["copy_gbps"], png, device)
            lines += dequantize_section(rec, rows, f"plots/{png.name}")
        for name in ("unsloth_puzzle", "mlp_compile"):
            if name in bench:
                lines += simple_section(name, *bench[name])
        if "dequant_bias" in bench:
            rec, rows = bench["dequant_bias"]
            names = []
            for acc in sorted({r["params"]["acc"] for r in rows}):
                png = plots / f"dequant_bias-{slug}-{acc}.png"
                plot_dequant_bias(rows, rec["copy_gbps"], png, device, acc)
                names.append(f"plots/{png.name}")
            lines += dequant_bias_section(rec, rows, names)
        lines += runs_section(data["runs"], bench)
    path = out / "benchmarks.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tritonbits-report", description=__doc__)
    parser.add_argument("--records", default="docs/gpu-runs")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args(argv)
    print(f"wrote {render(args.records, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

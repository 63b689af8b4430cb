"""Render docs/benchmarks.md and PNG plots from the run records in docs/gpu-runs/ (matplotlib).

  python -m tritonbits_harness.report --records docs/gpu-runs --out docs

For each device, the latest benchmark rows of each benchmark (a run may hold a subset of them) and the
latest test record of each session are shown. Nothing is typed in by hand: every number comes from a record.

Each benchmark found in the records is rendered by its registration's `section` (bench/registry.py), or by
`generic_section` when it has none or is no longer registered; sections come in the order the benchmarks
first appear in the device's records. This module names no benchmark.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from . import records, throttle
from .bench import SectionInput, load_all

MODES = {"graph": "CUDA-graph replay (launch gaps removed)", "launch": "do_bench (launch included)",
         "wall": "wall clock"}  # fmt: skip


def latest_by_device(recs: list[dict]) -> dict[str, dict]:
    """device -> {"bench": {benchmark: (record, rows)}, "tests": {session: record}, "runs": [record]}.

    A benchmark shows its newest run, a --quick one included: the kernels change between runs, and an older full
    sweep would show a kernel that no longer ships. A run whose record names a later commit that reverted what it
    measured (`"reverted_by"`, added to the record with the revert) is listed but not shown. Every other run is
    listed with its summary."""
    out: dict[str, dict] = defaultdict(lambda: {"bench": {}, "tests": {}, "runs": [], "e2e": None})
    for rec in sorted([*recs, *merged_shards(recs)], key=lambda r: r["environment"]["date"]):
        dev = rec["environment"]["device"]
        if rec.get("meaningless"):
            continue
        if rec["kind"] == "bench":
            out[dev]["runs"].append(rec)
            if rec.get("reverted_by") or rec.get("shard"):  # a shard is shown only inside its complete set
                continue
            for name in rec.get("benchmarks", {}):
                rows = [r for r in rec["rows"] if r["benchmark"] == name]
                if rows:
                    out[dev]["bench"][name] = (rec, rows)
        elif rec["kind"] == "tests":
            out[dev]["tests"][rec["name"]] = rec
        elif rec["kind"] == "e2e":  # the newest end-to-end run (tritonbits_harness.e2e)
            out[dev]["e2e"] = rec
    return out


def merged_shards(recs: list[dict]) -> list[dict]:
    """One bench record per complete set of shards (`bench --shard I/N`: the same device, commit, N, quick flag
    and benchmarks, every I from 1 to N; the newest record of each I): the shards' rows in shard order, the
    newest shard's environment and copy figure, `merged_from` the shards' dates. Incomplete sets merge nothing."""
    groups: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for rec in sorted(recs, key=lambda r: r["environment"]["date"]):
        shard = rec.get("shard")
        if rec.get("kind") != "bench" or not shard or rec.get("meaningless"):
            continue
        env = rec["environment"]
        key = (env["device"], env.get("git_sha"), shard[1], bool(rec.get("quick")), tuple(sorted(rec["benchmarks"])))
        groups[key][shard[0]] = rec
    merged = []
    for (_, _, n, _, _), parts in groups.items():
        if sorted(parts) != list(range(1, n + 1)):
            continue
        ordered = [parts[i] for i in range(1, n + 1)]
        newest = max(ordered, key=lambda r: r["environment"]["date"])
        merged.append({**newest, "shard": None, "rows": [row for r in ordered for row in r["rows"]],
                       "errors": {k: v for r in ordered for k, v in r.get("errors", {}).items()},
                       "notes": [note for r in ordered for note in r.get("notes", [])],
                       "throttle": throttle.combine([r.get("throttle") for r in ordered]),
                       "merged_from": [r["environment"]["date"] for r in ordered]})  # fmt: skip
    return merged


def subject_of(name: str, meta: dict) -> str:
    """The provider a benchmark's speed-ups are relative to: the record's, else the registration's."""
    if meta.get("subject"):
        return meta["subject"]
    bench = load_all().get(name)
    return bench.subject if bench is not None else "tritonbits"


def runs_section(runs: list[dict], shown: dict) -> list[str]:
    """Every bench run of the device, with the tritonbits speed-up over each baseline (CUDA graph)."""
    body = []
    for rec in runs:
        for name in rec.get("benchmarks", {}):
            rows = [r for r in rec["rows"] if r["benchmark"] == name]
            if not rows:
                continue
            subject = subject_of(name, rec["benchmarks"][name])
            mode = "graph" if any(r["mode"] == "graph" for r in rows) else rows[0]["mode"]
            cases = by_case(rows, mode)
            parts = []
            for base in rec["benchmarks"][name]["baselines"]:
                vals = [c[base]["ms"] / c[subject]["ms"] for c in cases.values() if base in c and subject in c]
                if vals:
                    parts.append(f"{base} {min(vals):.2f}–{max(vals):.2f}×")
            used = "shown above" if shown.get(name, (None,))[0] is rec else "—"
            if rec.get("reverted_by"):
                used = f"reverted by {rec['reverted_by']}"
            elif rec.get("shard"):
                used = f"shard {rec['shard'][0]}/{rec['shard'][1]}"
            elif rec.get("merged_from"):
                used += f" (shards of {', '.join(rec['merged_from'])})"
            body.append([rec["environment"]["date"], rec["environment"]["git_sha"], name, str(len(cases)), mode,
                         "; ".join(parts), used])  # fmt: skip
    header = ["date", "git", "benchmark", "cases", "mode", "baseline time / subject time (min–max)", "tables"]
    return ["### All benchmark runs", "", table(header, body), ""]


def env_line(rec: dict) -> str:
    e = rec["environment"]
    line = (f"{e['device']} (sm{''.join(map(str, e['capability'] or []))}, driver {e['driver']}), torch {e['torch']}, "
            f"triton {e['triton']}, bitsandbytes {e['bitsandbytes']}, git {e['git_sha']}, {e['date']}")  # fmt: skip
    if throttle.is_throttled(rec):
        t = rec["throttle"]
        line += (f" — **the GPU throttled**: {throttle.thermal_seconds(t):.1f} s of thermal slowdown in the run's "
                 f"{t['seconds']:.0f} s")  # fmt: skip
    return line


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def by_case(rows: list[dict], mode: str) -> dict[str, dict[str, dict]]:
    cases: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r["mode"] == mode:
            cases[r["case"]][r["provider"]] = r
    return cases


def generic_section(inp: SectionInput) -> list[str]:
    """Any benchmark: per mode, every provider's median ms, the subject's GB/s when the rows have a bytes
    model, and each provider's time over the subject's."""
    meta = inp.record["benchmarks"][inp.name]
    subject = inp.subject
    out = [f"### {inp.name} — {meta['description']}", "", f"Run: {env_line(inp.record)}.", ""]
    for mode in sorted({r["mode"] for r in inp.rows}):
        cases = by_case(inp.rows, mode)
        providers = sorted({p for c in cases.values() for p in c}, key=lambda p: (p != subject, p))
        with_gbps = any("gbps" in c.get(subject, {}) for c in cases.values())
        header = ["case", *[f"{p} (ms)" for p in providers], *[f"{p} / {subject}" for p in providers[1:]]]
        header += [f"{subject} GB/s"] if with_gbps else []
        body = []
        for case, prov in cases.items():
            ref = prov[subject]["ms"] if subject in prov else float("nan")
            row = [case, *[f"{prov[p]['ms']:.3f}" if p in prov else "—" for p in providers],
                   *[f"{prov[p]['ms'] / ref:.2f}" if p in prov else "—" for p in providers[1:]]]  # fmt: skip
            if with_gbps:
                row.append(f"{prov[subject]['gbps']:.0f}" if "gbps" in prov.get(subject, {}) else "—")
            body.append(row)
        out += [f"**{MODES.get(mode, mode)}**", "", table(header, body), ""]
    return out


def tests_section(tests: dict[str, dict]) -> list[str]:
    if not tests:
        return []
    body = []
    for name, rec in sorted(tests.items()):
        c = rec["counts"]
        body.append([f"test-{name}", str(c.get("passed", 0)), str(c.get("failed", 0)), str(c.get("skipped", 0)),
                     str(c.get("error", 0)), rec["environment"]["git_sha"], rec["environment"]["date"]])  # fmt: skip
    return ["### GPU test sessions", "", table(["session", "passed", "failed", "skipped", "errors", "git", "date"],
                                                 body), ""]  # fmt: skip


def render(record_dir: str, out_dir: str) -> Path:
    out = Path(out_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    lines = ["# Benchmarks", "", "Rendered by `nox -s report` from the JSON records in docs/gpu-runs/ — do not edit.",
             "Ratios are measured side by side in one run on one GPU; GB/s come from each benchmark's bytes model.",
             ""]  # fmt: skip
    registry = load_all()
    for device, data in sorted(latest_by_device(records.load(record_dir)).items()):
        lines += [f"## {device}", ""]
        lines += tests_section(data["tests"])
        bench = data["bench"]
        for name in bench:
            rec, rows = bench[name]
            registered = registry.get(name)
            inp = SectionInput(name=name, record=rec, rows=rows, plot_dir=plots, device=device,
                               subject=subject_of(name, rec["benchmarks"][name]))  # fmt: skip
            render_section = registered.section if registered and registered.section else generic_section
            lines += render_section(inp)
        lines += runs_section(data["runs"], bench)
        if data["e2e"] is not None:
            from . import e2e

            lines += e2e.markdown_section(data["e2e"])
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

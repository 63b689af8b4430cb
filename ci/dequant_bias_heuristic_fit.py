"""dequant_bias's fallback heuristic against the tuned best, offline, from the tuner's dumps.

`nox -s tune-<gpu> -- --op dequant_bias --dump PATH` writes every candidate's CUDA-graph time per key. This
script reads such dumps (no GPU needed) and, for each, counts the keys where `heuristic_config` (contiguous
inputs) is over --limit x the key's best candidate, at the issue's N (1000, 6144, 11008, 28672) and at every N;
--show lists them, --nearest also scores a lookup that falls back to the nearest tuned N. Session 13's rule
(one flat config per acc width: 1024 x 8 warps for 4-byte acc, 2048 x 8 for 2-byte) is scored beside it for
reference.

    uv run python ci/dequant_bias_heuristic_fit.py docs/gpu-runs/logs/*-tune-dequant_bias-dump.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from tritonbits.ops import dequant_bias as db

COMPARE_NS = (1000, 6144, 11008, 28672)
ITEMSIZE = {"int32": 4, "fp32": 4, "bf16": 2, "fp16": 2}


def session13_rule(m: int, n: int, itemsize: int, acc: str) -> tuple:
    return ("1d", 256 * (16 // itemsize), 8)


def current_rule(m: int, n: int, itemsize: int, acc: str) -> tuple:
    return db.heuristic_config(m, n, True)


def nearest_rule(rows: list[dict]):
    """Leave-one-out: each key takes the best config of the nearest other tuned N (log distance; 13824 and 14336
    share a key), same acc and M, as a table lookup that falls back to its nearest entry would."""
    best = {(r["case"]["acc"], r["case"]["m"], r["case"]["n"]): tuple(r["best"]) for r in rows}
    ns = sorted({n for _, _, n in best})
    same_key = {13824, 14336}

    def rule(m: int, n: int, itemsize: int, acc: str) -> tuple:
        others = [o for o in ns if o != n and not (n in same_key and o in same_key)]
        near = min(others, key=lambda o: abs(math.log(o / n)))
        return best[(acc, m, near)]

    return rule


def score(rows: list[dict], rule, limit: float, only_compare: bool) -> tuple[list[tuple], int, float]:
    """(rows over `limit`, rows scored, worst ratio)."""
    over, worst, scored = [], 0.0, 0
    for r in rows:
        case = r["case"]
        if only_compare and case["n"] not in COMPARE_NS:
            continue
        times = {tuple(json.loads(k)): v for k, v in r["times"].items()}
        cfg = tuple(rule(case["m"], case["n"], ITEMSIZE[case["acc"]], case["acc"]))
        if cfg not in times:
            raise SystemExit(f"{r['key']}: the heuristic's {cfg} is not among the dump's candidates")
        ratio = times[cfg] / r["best_ms"]
        scored += 1
        worst = max(worst, ratio)
        if ratio > limit:
            over.append((r["key"], case["n"], cfg, round(ratio, 3), round(r["best_ms"] * 1e3, 2)))
    return over, scored, worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dumps", nargs="+", type=Path)
    p.add_argument("--limit", type=float, default=1.05)
    p.add_argument("--show", action="store_true", help="list the keys over the limit (current heuristic)")
    p.add_argument("--nearest", action="store_true", help="also score the nearest other tuned N's best config")
    args = p.parse_args()
    for path in args.dumps:
        dump = json.loads(path.read_text())
        rows = dump["rows"]
        print(f"{path.name} (family {dump['family']}, {len(rows)} keys)")
        slowdown = (dump.get("throttle") or {}).get("slowdown_s") or {}
        if any(v > 0 for k, v in slowdown.items() if k != "sw_power_capping"):
            print(f"  WARNING: the GPU throttled during this sweep ({slowdown}): its timings mislead")
        rules = [("heuristic_config", current_rule), ("session 13's rule", session13_rule)]
        if args.nearest:
            rules.append(("nearest tuned N", nearest_rule(rows)))
        for name, rule in rules:
            for only in (True, False):
                over, scored, worst = score(rows, rule, args.limit, only)
                where = "issue's N" if only else "every N"
                print(f"  {name:18s} {where:9s}: over {args.limit}x the best at {len(over):3d} of {scored} keys, "
                      f"worst {worst:.3f}x")  # fmt: skip
                if args.show and rule is current_rule and not only:
                    for o in sorted(over, key=lambda o: -o[3]):
                        print(f"      {o[0]:18s} N={o[1]:<6d} {o[2]} {o[3]:.3f}x (best {o[4]} us)")


if __name__ == "__main__":
    main()

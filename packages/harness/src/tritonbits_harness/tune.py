"""Sweep kernel configs on the present GPU, op by op (`nox -s tune-<gpu> -- --op NAME`).

  python -m tritonbits_harness.tune --gpu h100                        dequant_bias: rewrite its table
  python -m tritonbits_harness.tune --gpu h100 --op dequantize_4bit   print the dequantize variant sweep
  python -m tritonbits_harness.tune --gpu h100 --write /tmp/t.json    write the table elsewhere
  python -m tritonbits_harness.tune --gpu h100 --op linear_4bit --keys /m8/ --keys /m16/
                                                                      only those keys, the others kept
  python -m tritonbits_harness.tune --gpu h100 --compare-heuristic    heuristic vs tuned best, no write

Each tunable op is registered in `TUNABLE`. One with a table names its cases, its candidate configs, a
timing function and the op's own key function (the one its lookup calls, so every tuned entry is found):
the fastest candidate of each key (CUDA-graph median, launch gaps removed) is written with
`tritonbits.configs.write` under the GPU family `tritonbits._runtime.gpu_family` gives this device,
into the op's table beside the installed tritonbits package (packages/kernels/src/tritonbits/configs/
in the workspace). An op without a table prints its sweep. Nothing is tuned at call time.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tritonbits import _runtime, configs

from . import gpus, throttle, timing
from .bench.runner import progress_bar


@dataclass(frozen=True)
class TunableOp:
    """A tunable op. With `key`/`candidates`/`time` it has a config table; else `sweep_only` prints."""

    name: str
    description: str
    cases: Callable[[], list[dict]] = lambda: []
    key: Callable[[dict], str] | None = None  # the op's own table key of a case
    candidates: Callable[[dict], list[Any]] | None = None  # configs worth timing on a case
    time: Callable[[dict, Any, int], float] | None = None  # (case, config, rep_ms) -> ms
    sweep_only: Callable[[Console, int, argparse.Namespace], None] | None = None
    heuristic: Callable[[dict], Any] | None = None  # the op's untuned fallback of a case, timed alongside
    compare_cases: Callable[[dict], bool] | None = None  # the cases --compare-heuristic times
    # a near-tie rule: of the candidates within `tie` of the fastest, the one `rank` puts first is written (ties
    # in rank: the fastest); None: the fastest
    rank: Callable[[dict, Any], int] | None = None
    tie: float = 0.0

    @property
    def has_table(self) -> bool:
        return self.key is not None


TUNABLE: dict[str, TunableOp] = {}


def register(op: TunableOp) -> TunableOp:
    if op.name in TUNABLE:
        raise ValueError(f"tunable op {op.name!r} registered twice")
    if op.has_table and (op.candidates is None or op.time is None):
        raise ValueError(f"tunable op {op.name!r} has a key but no candidates or time function")
    if not op.has_table and op.sweep_only is None:
        raise ValueError(f"tunable op {op.name!r} has neither a table (key) nor a sweep_only function")
    TUNABLE[op.name] = op
    return op


def representatives(op: TunableOp, where: Callable[[dict], bool] | None = None) -> dict[str, dict]:
    """key -> the first case with that key (all cases of a key share one config), among the cases `where`
    accepts."""
    assert op.key is not None
    out: dict[str, dict] = {}
    for case in op.cases():
        if where is not None and not where(case):
            continue
        out.setdefault(op.key(case), case)
    return out


def sweep(
    op: TunableOp,
    rep_ms: int,
    progress: Progress,
    cases: dict[str, dict] | None = None,
    comparison: list[dict] | None = None,
    on_key: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """{key: the fastest candidate config on the key's representative case}. With `comparison` (a list to
    fill) and an op with a heuristic, the heuristic's config is timed in the same run, right after the
    candidates, and one row per key is appended: case, best config and ms, heuristic config and ms, and every
    candidate's ms (`times`, keyed by the config as JSON) for fitting a heuristic offline. Each finished key is
    printed (the progress bar is not drawn when the output is a log file) and passed to `on_key` with every
    entry so far (tune_table saves them: a run stopped by a time limit keeps the keys it finished)."""
    if not op.has_table:
        raise ValueError(f"op {op.name!r} has no config table to sweep")
    assert op.candidates is not None and op.time is not None
    reps = representatives(op) if cases is None else cases
    compare = comparison is not None and op.heuristic is not None
    total = sum(len(op.candidates(c)) + compare for c in reps.values())
    task = progress.add_task(f"{op.name}: {len(reps)} keys, {total} timings", total=total)
    entries: dict[str, Any] = {}
    for key, case in reps.items():
        best: tuple[float, Any] | None = None
        times: dict[str, float] = {}
        candidates = op.candidates(case)
        if not candidates:
            raise ValueError(f"{op.name}: no candidate config for {case}")
        for cfg in candidates:
            ms = op.time(case, cfg, rep_ms)
            if not math.isfinite(ms):  # a NaN would stick as the best (every comparison with it is False)
                ms = float("inf")
            times[config_json(cfg)] = ms
            if best is None or ms < best[0]:
                best = (ms, cfg)
            progress.advance(task)
        if best is None or best[0] == float("inf"):
            raise ValueError(f"{op.name}: no candidate for {case} ran on this GPU")
        fastest = best
        best = choose(op, case, candidates, times, fastest)
        entries[key] = best[1]
        line = f"{op.name} {key}: best {_config_text(best[1])} {1e3 * best[0]:.2f} us of {len(candidates)}"
        if best is not fastest:
            line += f" (the fastest, {_config_text(fastest[1])}, {1e3 * fastest[0]:.2f} us: within {op.tie:.0%})"
        if compare:
            assert op.heuristic is not None and comparison is not None
            heuristic = op.heuristic(case)
            h_ms = op.time(case, heuristic, rep_ms)
            progress.advance(task)
            comparison.append({"key": key, "case": case, "best": best[1], "best_ms": best[0],
                               "heuristic": heuristic, "heuristic_ms": h_ms, "times": times})  # fmt: skip
            line += f"; heuristic {1e3 * h_ms:.2f} us ({h_ms / best[0]:.3f}x)"
        progress.console.print(line)
        if on_key is not None:
            on_key(entries)
    return entries


def choose(op: TunableOp, case: dict, candidates: list, times: dict[str, float], fastest: tuple[float, Any]):
    """(ms, config) written for a key: the fastest, or with `op.rank` the best-ranked of those within `op.tie` of
    it (then the fastest of that rank)."""
    if op.rank is None:
        return fastest
    near = [(op.rank(case, c), times[config_json(c)], c) for c in candidates
            if times[config_json(c)] <= fastest[0] * (1 + op.tie)]  # fmt: skip
    _rank, ms, cfg = min(near, key=lambda t: (t[0], t[1]))
    return fastest if cfg == fastest[1] else (ms, cfg)


def config_json(cfg: Any) -> str:
    """A config as a JSON key: a tuple config (dequant_bias) as its list, a dict config (linear_4bit) with its
    items (`list(cfg)` of a dict is its keys: every candidate would share one key)."""
    return json.dumps(cfg, sort_keys=True) if isinstance(cfg, dict) else json.dumps(list(cfg))


def _config_text(cfg: Any) -> str:
    if isinstance(cfg, dict):
        return " ".join(f"{k}={v}" for k, v in cfg.items())
    return str(tuple(cfg))


def count_timings(op: TunableOp, cases: dict[str, dict], compare: bool) -> int:
    assert op.candidates is not None
    return sum(len(op.candidates(c)) + (compare and op.heuristic is not None) for c in cases.values())


def print_comparison(console: Console, op_name: str, rows: list[dict], limit: float = 1.05) -> int:
    """The heuristic against the tuned best of each key; returns how many keys are over `limit`x."""
    table = Table(title=f"{op_name}: heuristic vs tuned best (CUDA-graph medians, same run)")
    for col in ("key", "case", "best", "best us", "heuristic", "heuristic us", "ratio"):
        table.add_column(col, justify="right" if "us" in col or col == "ratio" else "left")
    over = 0
    for r in rows:
        ratio = r["heuristic_ms"] / r["best_ms"]
        over += ratio > limit
        mark = "[red]" if ratio > limit else ""
        table.add_row(r["key"], " ".join(f"{k}={v}" for k, v in r["case"].items()), _config_text(r["best"]),
                      f"{1e3 * r['best_ms']:.2f}", _config_text(r["heuristic"]), f"{1e3 * r['heuristic_ms']:.2f}",
                      f"{mark}{ratio:.3f}")  # fmt: skip
    console.print(table)
    console.print(f"heuristic over {limit:.2f}x the tuned best at {over} of {len(rows)} keys")
    return over


def tune_table(
    op: TunableOp,
    family: str,
    console: Console,
    rep_ms: int,
    path: Path | None = None,
    dump: Path | None = None,
    keys: list[str] | None = None,
) -> Path:
    """Sweep `op` and replace `family`'s entries of its table (configs.write; `path` overrides where); the
    heuristic is timed in the same run and compared. `keys`: tune only the keys containing one of these
    substrings and keep the family's other entries, or its fallback family's where it has none yet (a sweep too
    long for one run, split over several). The table and the dump are saved after every key (`sweep`'s on_key),
    so a run stopped by a time limit keeps what it finished."""
    reps = representatives(op)
    kept: dict[str, Any] = {}
    if keys:
        reps = {k: c for k, c in reps.items() if any(sub in k for sub in keys)}
        if not reps:
            raise ValueError(f"--keys {keys}: no {op.name} key contains any of them")
        table_file = path or configs.table_path(op.name)
        data = json.loads(table_file.read_text()) if table_file.exists() else {}
        # a family without entries of its own reads its fallback's (configs.FALLBACK_FAMILY): keep those, or the
        # new table would hide every entry the family ran with
        old = data.get(family) or data.get(configs.FALLBACK_FAMILY.get(family, ""), {})
        kept = {k: v for k, v in old.items() if k not in reps}
    console.print(f"{op.name}: {len(reps)} keys, {count_timings(op, reps, True)} timings at --rep-ms {rep_ms}")
    comparison: list[dict] = []
    table_file = path or configs.table_path(op.name)
    before = json.loads(table_file.read_text()).get(family, {}) if table_file.exists() else {}

    def save(done: dict[str, Any]) -> None:
        """After each key: the keys done so far over the table as it was (a full run replaces the family's
        entries only at its end), and the dump so far."""
        configs.write(op.name, family, {**before, **kept, **done}, path)
        if dump is not None:
            dump_rows(dump, family, comparison)

    with progress_bar(console) as progress:
        entries = sweep(op, rep_ms, progress, reps, comparison, on_key=save)
    written = configs.write(op.name, family, {**kept, **entries}, path)
    console.print(f"wrote {len(entries)} {op.name} configs for {family} to {written}"
                  + (f" (kept its {len(kept)} other entries)" if keys else ""))  # fmt: skip
    if comparison:
        print_comparison(console, op.name, comparison)
    if dump is not None:
        dump_rows(dump, family, comparison)
    return written


def dump_rows(path: Path, family: str, rows: list[dict]) -> None:
    """Every key's timings (config JSON -> ms) with its case, as JSON, for fitting a heuristic offline."""
    path.write_text(json.dumps({"family": family, "rows": rows}, indent=1, default=list))


def compare_heuristic(op: TunableOp, console: Console, rep_ms: int) -> int:
    """Time the candidates and the heuristic on the op's comparison cases (one per key); print, write nothing."""
    if op.heuristic is None or op.compare_cases is None:
        console.print(f"[red]{op.name} has no heuristic to compare")
        return 2
    reps = representatives(op, op.compare_cases)
    console.print(f"{op.name}: {len(reps)} keys, {count_timings(op, reps, True)} timings at --rep-ms {rep_ms}")
    comparison: list[dict] = []
    with progress_bar(console) as progress:
        sweep(op, rep_ms, progress, reps, comparison)
    print_comparison(console, op.name, comparison)
    return 0


# --- dequant_bias: ("1d", BLOCK, warps) | ("2d", BLOCK_M, BLOCK_N, warps) per (acc, M bucket, N bucket) ---

# NOTE: the 2-D tiles the H200 table chose most often (BLOCK_M x BLOCK_N, 1K-8K elements), each at 4 and 8
# warps; the 1-D path serves contiguous inputs (what the tuner times), so the 2-D list is kept short for the
# sweep to fit one device call (180 keys x 18 candidates).
TILES_2D = ((2, 512), (4, 256), (8, 256), (16, 128), (32, 128))
WARPS = (4, 8)
# NOTE: 1-D programs: 4-16 elements per thread (16-byte accesses of the bf16 output need >= 8).
CONFIGS_1D = (("1d", 256, 1), ("1d", 512, 2), ("1d", 512, 4), ("1d", 1024, 4), ("1d", 1024, 8), ("1d", 2048, 4),
              ("1d", 2048, 8), ("1d", 4096, 8))  # fmt: skip
COMPARE_NS = (1000, 6144, 11008, 28672)  # the N: the heuristic must stay within 5% of the best


def candidate_configs(m: int) -> list[tuple]:
    """2-D tiles no taller than 2*M, then every 1-D config (the tuner's inputs are contiguous)."""
    out: list[tuple] = [("2d", bm, bn, w) for bm, bn in TILES_2D if bm <= max(m, 1) * 2 for w in WARPS]
    return out + list(CONFIGS_1D)


def _dequant_bias_cases() -> list[dict]:
    from .bench import dequant_bias as bench

    return bench.cases(cpu=False)


def _dequant_bias_key(case: dict) -> str:
    from tritonbits.ops import dequant_bias as db

    from .bench import dequant_bias as bench

    return db.config_key(bench.ACC[case["acc"]], case["m"], case["n"])


def _dequant_bias_time(case: dict, config: tuple, rep_ms: int) -> float:
    from tritonbits.ops import dequant_bias as db

    from .bench import dequant_bias as bench

    a, sa, sb, bias = _dequant_bias_operands(case["acc"], case["m"], case["n"])
    strides = db.validate(a, sa, sb, bias, bench.OUT, None)

    def call() -> None:
        # NOTE: out allocated per call, as users and the benchmark do: with a preallocated out the H100 ranked
        # configs differently at L2-resident sizes (fp32 acc 128x28672: 4.4 us tuned, 5.4 us in the bench)
        out = torch.empty(a.shape, dtype=bench.OUT, device=a.device)
        db.launch(a, sa, sb, bias, out, *strides, config=config)

    return timing.bench_graph(call, rep=rep_ms)


def _dequant_bias_heuristic(case: dict) -> tuple:
    from tritonbits.ops import dequant_bias as db

    return db.heuristic_config(case["m"], case["n"], True)  # contiguous, as timed


@functools.lru_cache(maxsize=1)
def _dequant_bias_operands(acc: str, m: int, n: int):
    """One case's operands, kept while its candidates are timed one after another."""
    from .bench import dequant_bias as bench

    return bench.operands({"m": m, "n": n, "acc": acc}, torch.device("cuda"))


register(TunableOp(
    name="dequant_bias",
    description='("1d", BLOCK, warps) or ("2d", BLOCK_M, BLOCK_N, warps) per acc dtype and M, N buckets',
    cases=_dequant_bias_cases,
    key=_dequant_bias_key,
    candidates=lambda case: candidate_configs(case["m"]),
    time=_dequant_bias_time,
    heuristic=lambda case: _dequant_bias_heuristic(case),
    compare_cases=lambda case: case["n"] in COMPARE_NS,
))  # fmt: skip


# --- linear_4bit: path + config per (x width, M, N, K) bucket ------------------------------------------

# (BLOCK_N, BLOCK_K, warps) of the gemv; a tile is kept when its fp32 accumulator needs <= 64 registers/thread.
# Timed only below GEMV_MAX_NK weights: at the shapes gemv2 beat it everywhere (no table entry names it)
GEMV_MAX_NK = 4096 * 4096
GEMV_TILES = ((32, 128, 4), (64, 128, 4), (64, 128, 8), (64, 256, 8), (128, 128, 8), (128, 64, 8), (32, 256, 4),
              (16, 256, 4), (256, 64, 8), (128, 256, 8))  # fmt: skip


# (BLOCK_N, BLOCK_K, warps) of gemv2 (x in registers: 8 * BLOCK_M fp32 per word a thread holds a row step)
GEMV2_TILES = ((16, 1024, 4), (8, 1024, 4), (32, 1024, 8), (16, 512, 4), (8, 512, 2), (16, 256, 4), (4, 256, 1),
               (32, 128, 4))  # fmt: skip


def gemv2_candidates(m: int, n: int, k: int, sms: int) -> list[dict]:
    """gemv2 configs for M <= 4 (BLOCK_M <= 4; from M=4 on the tensor-core gemm wins: H100 probe log
    20261123T2115Z, 4096 x 4096 M=4 12.3 vs 18.3 us); row ranges from the op's rule and 2x / 0.5x of it."""
    from tritonbits.ops import linear_4bit as L

    out: list[dict] = []
    if m > 4:
        return out
    for bm in sorted({L.bucket(m), min(L.bucket(m), 2)}, reverse=True):
        for bn, bk, warps in GEMV2_TILES:
            if k % bk:
                continue
            base = L.gemv2_rows(-(-m // bm), n, k // bk, bn, sms)
            for rows in sorted({base, max(bn, base // 2 // bn * bn), 2 * base}):
                for prefetch in (False, True) if bm >= 2 else (False,):  # L.GEMV2_PREFETCH's NOTE
                    out.append({"path": "gemv2", "bm": bm, "bn": bn, "bk": bk, "warps": warps, "stages": 1,
                                "rows": rows, "prefetch": prefetch})  # fmt: skip
    return out


# (BLOCK_N, BLOCK_K, warps) of the tensor-core gemm; a tile is kept when a thread decodes <= 128 weights a K step
# (more spills: 128 registers at 128, ci/sass_count.py under triton 3.6), and its pipelined x and word tiles fit
# in shared memory with room for the operand conversion (bm=128, bn=128, bk=256 asked the H100 for 236 KB)
GEMM_TILES = ((64, 128, 4), (128, 128, 4), (128, 128, 8), (64, 256, 4), (128, 256, 8), (128, 64, 4))
GEMM_STAGES, GEMM_SMEM = 3, 160 * 1024


def gemm_candidates(m: int, n: int, k: int, sms: int) -> list[dict]:
    """gemm configs for M <= 256: BLOCK_M the M bucket (16 at least: tl.dot's smallest side), split-K from the op's
    rule (`_split_for`) and twice that."""
    import triton

    from tritonbits.ops import linear_4bit as L

    out: list[dict] = []
    bms = (max(16, L.bucket(m)),) if m <= 64 else (64, 128)
    for bm in bms:
        for bn, bk, warps in GEMM_TILES:
            if k % bk or bn * bk // (warps * 32) > 128 or GEMM_STAGES * (2 * bk * bm + bn * bk // 2) > GEMM_SMEM:
                continue
            split = L._split_for(triton.cdiv(m, bm) * triton.cdiv(n, bn), k, bk, sms)
            for s in sorted({split, 2 * split if k // (bk * split * 2) >= 2 else split}):
                out.append({"path": "gemm", "bm": bm, "bn": bn, "bk": bk, "warps": warps, "stages": GEMM_STAGES,
                            "split_k": s})  # fmt: skip
    return out


# (warps, K splits, K warps) of the mma kernel (linear_4bit_mma): the probe's grid
# (ci/linear4bit_mma_probe.py; 4 warps with 8 splits within 2.4% of each issue shape's best at M = 1 and 4 on the
# H100, session 17), and one split with the warps splitting K (session 20: one launch, best or within 5% of the best
# at most of the probe's M <= 8 cases, log docs/gpu-runs/logs/20261124T1616Z-nvidia-h100-mma-kwarps-probe.txt)
MMA_WARPS = (2, 4, 8)
MMA_SPLITS = (1, 2, 4, 8, 16)
MMA_KWARPS = (2, 4, 8)
# NOTE: the kernel takes M <= 64, but at M = 64 its best config took 1.31-1.79x the gemm's time at every issue shape
# (H100, session 21, log docs/gpu-runs/logs/20261124T1826Z-nvidia-h100-mma-ntiles-probe.txt), so the tuner times it
# up to M = 32 only (M = 32: 0.82-1.11x the gemm's best there)
MMA_TUNE_MAX_M = 32


def mma_candidates(m: int, n: int, k: int) -> list[dict]:
    """mma configs for M <= MMA_TUNE_MAX_M (x and W of one 16-bit dtype, K a multiple of 256: the tuner's cases
    are)."""
    from tritonbits.ops import linear_4bit as L

    if m > min(MMA_TUNE_MAX_M, L.mma4.MAX_M) or k % L.mma4.SEGMENT or k < L.mma4.SEGMENT:
        return []
    segs = k // L.mma4.SEGMENT
    out = [{"path": "mma", "warps": warps, "split_k": split, "prefetch": True}
           for warps in MMA_WARPS for split in MMA_SPLITS if split <= segs]  # fmt: skip
    out += [{"path": "mma", "warps": warps, "split_k": 1, "kwarps": kw, "prefetch": True}
            for warps in MMA_WARPS for kw in MMA_KWARPS if warps % kw == 0]  # fmt: skip
    return out


# the wgmma kernel (linear_4bit_wgmma, sm90): the probe's grid (ci/linear4bit_wgmma_probe.py, H100, session 23, log
# docs/gpu-runs/logs/20261124T2203Z-nvidia-h100-wgmma-probe.txt): BLOCK_M M's bucket (at least 32, at most 256 since
# session 24) and
# half of it, one or two warpgroups, 1-4 K splits, products asynchronous or not
WGMMA_WG = (1, 2)
WGMMA_SPLITS = (1, 2, 4)


def wgmma_candidates(m: int, n: int, k: int) -> list[dict]:
    """wgmma configs for wg4.MIN_M <= M <= wg4.MAX_M and K a multiple of 256 (the tuner refuses them where
    `wgmma_ok` does: another GPU)."""
    from tritonbits.ops import linear_4bit as L

    if not L.wg4.MIN_M <= m <= L.wg4.MAX_M or k % L.wg4.SEGMENT or k < L.wg4.SEGMENT:
        return []
    top = min(256, max(32, L.bucket(m)))
    segs = k // L.wg4.SEGMENT
    return [{"path": "wgmma", "bm": bm, "wg": wg, "split_k": split, "async": asy}
            for bm in sorted({top, max(32, top // 2)}) for wg in WGMMA_WG for split in WGMMA_SPLITS
            for asy in (True, False) if split <= segs]  # fmt: skip


# NOTE: an eager linear_4bit call with a one-launch config (no split-K workspace, no reduction kernel) took 15.8-16.4
# us back to back against 25.4-26.2 us with two launches where the GPU time is small (4096 x 4096 and 4096 x 1024, M
# = 1..16, H100, bf16; the ~9.5 us is the second bound launch and the workspace's allocation), so the tuner takes a
# one-launch config within LINEAR_4BIT_TIE of the fastest: CUDA-graph time a few percent at most, host time a
# launch less (log docs/gpu-runs/logs/20261124T1616Z-nvidia-h100-mma-kwarps-probe.txt).
LINEAR_4BIT_TIE = 0.03


def linear_4bit_launches(case: dict, config: dict) -> int:
    """How many kernels the op launches for a config on a case: the tuner's near-tie rank."""
    from tritonbits.ops import linear_4bit as L

    return L.launch_count(config, case["m"], case["n"], case["k"])


def linear_4bit_candidates(m: int, n: int, k: int, sms: int) -> list[dict]:
    """Configs worth timing for one (M, N, K): gemv2 tiles up to M=4, gemv tiles up to M=8 on small weights (both
    decode tables), mma up to MMA_TUNE_MAX_M, wgmma at M = 17..256, tensor-core gemm tiles up to M=256, dequantize +
    cuBLAS from M=16; split-K from the op's own rule (`_split_for`)."""
    import triton

    from tritonbits.ops import linear_4bit as L

    out: list[dict] = gemv2_candidates(m, n, k, sms) + mma_candidates(m, n, k) + wgmma_candidates(m, n, k)
    if m <= 8 and n * k < GEMV_MAX_NK:
        bm = L.bucket(m)
        for bn, bk, warps in GEMV_TILES:
            if bm * bn * bk // 2 // (warps * 32) > 64:
                continue
            split = L._split_for(triton.cdiv(n, bn), k, bk, sms)
            for pair in (True, False):
                out.append({"path": "gemv", "bm": bm, "bn": bn, "bk": bk, "warps": warps, "stages": 3,
                            "pair": pair, "split_k": split})  # fmt: skip
    if m <= 256:
        out += gemm_candidates(m, n, k, sms)
    if m >= 16:
        out.append({"path": "dequant"})
    return out


def _linear_4bit_cases() -> list[dict]:
    from .bench import linear_4bit as bench

    return [c for c in bench.cases(cpu=False) if c["dtype"] == "bf16"]


def _linear_4bit_key(case: dict) -> str:
    from tritonbits.ops import linear_4bit as L

    from .bench import linear_4bit as bench

    return L.config_key(bench.DTYPES[case["dtype"]], case["m"], case["n"], case["k"])


@functools.lru_cache(maxsize=1)
def _linear_4bit_operands(m: int, k: int, n: int, dtype: str):
    """One case's operands (weight quantized by bnb, nf4 nested blocksize 64), kept while its candidates run."""
    import bitsandbytes.functional as F

    import tritonbits
    from tritonbits.ops import linear_4bit as L

    from .bench import linear_4bit as bench

    w = (torch.randn(n, k, device="cuda") * 0.02).to(bench.DTYPES[dtype])
    q, state = F.quantize_4bit(w, blocksize=bench.BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    x = torch.randn(m, k, device="cuda").to(bench.DTYPES[dtype])
    return x, L._prepare(q, state), tritonbits.dequantize_4bit(q, state)


def _linear_4bit_heuristic(case: dict) -> dict:
    """The op's untuned choice for a case (what a key without a table entry runs)."""
    from tritonbits.ops import linear_4bit as L

    from .bench import linear_4bit as bench

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return L.heuristic_config(bench.DTYPES[case["dtype"]], case["m"], case["n"], case["k"], sms,
                              wgmma=L.wgmma_device(torch.device("cuda", 0)))  # fmt: skip


def _linear_4bit_time(case: dict, config: dict, rep_ms: int) -> float:
    """CUDA-graph median of one config; a config whose result leaves the K-aware policy is refused (raises), one
    this GPU cannot hold (Triton's OutOfResources) takes inf."""
    import triton

    from tritonbits.ops import linear_4bit as L

    from .tolerance import assert_matmul

    x, prepared, wd = _linear_4bit_operands(case["m"], case["k"], case["n"], case["dtype"])
    if config.get("path") == "mma" and not L.mma_ok(prepared, x, x.device):
        return float("inf")  # else it would time the heuristic's fallback under the mma name
    if config.get("path") == "wgmma" and not L.wgmma_ok(prepared, x, x.device):
        return float("inf")  # likewise (not an sm90 GPU)
    try:
        out = L.forward_2d(x, prepared, None, config=config)
    except triton.runtime.errors.OutOfResources:  # a tile this GPU cannot hold is no candidate here
        return float("inf")
    rows = out.shape[0] if config.get("path") == "mma" else 8  # mma: every n tile (M <= MMA_TUNE_MAX_M)
    assert_matmul(out[:rows], x[:rows], wd)
    if config.get("path") == "wgmma":  # and the last BLOCK_M tile's last rows
        assert_matmul(out[-8:], x[-8:], wd)
    return timing.bench_graph(functools.partial(L.forward_2d, x, prepared, None, config=config), rep=rep_ms)


register(TunableOp(
    name="linear_4bit",
    description="path (gemv | gemv2 | gemm | mma | wgmma | dequant) and tile/split-K per x width and power-of-two M,"
    " N, K buckets",
    cases=_linear_4bit_cases,
    key=_linear_4bit_key,
    candidates=lambda case: linear_4bit_candidates(
        case["m"], case["n"], case["k"], torch.cuda.get_device_properties(0).multi_processor_count),
    time=_linear_4bit_time,
    heuristic=_linear_4bit_heuristic,
    compare_cases=lambda case: True,
    rank=linear_4bit_launches,
    tie=LINEAR_4BIT_TIE,
))  # fmt: skip


# --- dequantize_4bit: the launch variants, printed (its tile choice is fixed in the kernel) -----------

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
    for key, compiled in dq._launcher.compiled.items():  # registers of every specialization the sweep compiled
        kernel = compiled.kernel
        console.print(f"compiled {key[2]} {dict(key[3])}: {kernel.n_regs} registers, {kernel.n_spills} spills")


register(TunableOp(
    name="dequantize_4bit",
    description="variant sweep (tiles, warps, registers, eviction hints), printed; no table",
    sweep_only=lambda console, rep_ms, args: tune_dequantize_4bit(console, rep_ms, gpus.DTYPES[args.dtype]),
))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tritonbits-tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--gpu", required=True, choices=sorted(gpus.PROFILES))
    parser.add_argument("--op", default="dequant_bias", choices=sorted(TUNABLE), help="the op to tune")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"), help="dequantize_4bit output")
    parser.add_argument("--any-gpu", action="store_true", help="tune on another GPU (written under its family)")
    parser.add_argument("--rep-ms", type=int, default=10)
    parser.add_argument(
        "--compare-heuristic",
        action="store_true",
        help="time the tuned-best candidates and the heuristic on the issue's N; write nothing",
    )
    parser.add_argument("--dump", default=None, metavar="PATH",
                        help="write every candidate's timing per key (JSON) for fitting the heuristic")  # fmt: skip
    parser.add_argument("--keys", action="append", default=None, metavar="SUBSTR",
                        help="tune only the keys containing SUBSTR (repeatable: any of them) and keep the table's "
                        "other entries for this GPU family")  # fmt: skip
    parser.add_argument("--allow-throttled", action="store_true",
                        help="keep the new table though the GPU throttled (thermal) during the sweep")  # fmt: skip
    parser.add_argument("--write", default=None, metavar="PATH",
                        help="write the table here instead of beside the tritonbits package")  # fmt: skip
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 140)
    if not torch.cuda.is_available():
        console.print("[red]tune needs a CUDA device")
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    family = _runtime.gpu_family(device)
    if family != args.gpu and not args.any_gpu:
        console.print(f"[red]this machine's GPU family is {family} ({torch.cuda.get_device_name(device)}), "
                      f"not {args.gpu} (pass --any-gpu to tune it anyway, under {family})")  # fmt: skip
        return 2
    op = TUNABLE[args.op]
    console.print(f"tuning {op.name} on {torch.cuda.get_device_name(device)} (family {family}): {op.description}")
    if not op.has_table:
        if args.write:
            console.print(f"[red]--write: {op.name} has no config table to write")
            return 2
        assert op.sweep_only is not None
        op.sweep_only(console, args.rep_ms, args)
        return 0
    if args.compare_heuristic:
        with throttle.Watch(device.index or 0) as watch:
            rc = compare_heuristic(op, console, args.rep_ms)
        return _throttle_verdict(console, watch, rc)
    return tune_unless_throttled(op, family, console, args.rep_ms, Path(args.write) if args.write else None,
                                 Path(args.dump) if args.dump else None, args.keys, args.allow_throttled,
                                 device.index or 0)  # fmt: skip


def tune_unless_throttled(op: TunableOp, family: str, console: Console, rep_ms: int, path: Path | None = None,
                          dump: Path | None = None, keys: list[str] | None = None, allow_throttled: bool = False,
                          gpu_index: int = 0) -> int:  # fmt: skip
    """`tune_table` watched by the GPU's clock-slowdown counters: if the GPU throttled (thermal) during the
    sweep, the table file is put back as it was (unless `allow_throttled`) and 3 returned. A throttled sweep
    ranks candidates by when they ran, not by their speed."""
    table_file = path or configs.table_path(op.name)
    before = table_file.read_text() if table_file.exists() else None
    watch = throttle.Watch(gpu_index)
    try:
        with watch:
            tune_table(op, family, console, rep_ms, path, dump, keys)
    finally:  # also when the sweep or its report raised after the table was written
        if watch.thermal_s > 0 and not allow_throttled:
            if before is None:
                table_file.unlink(missing_ok=True)
            else:
                table_file.write_text(before)
            configs.table.cache_clear()
            console.print(f"[red]{table_file} left as it was (pass --allow-throttled to keep the new table)")
    if dump is not None and dump.exists():  # the dump says whether its timings were taken on a throttled GPU
        dump.write_text(json.dumps({**json.loads(dump.read_text()), "throttle": watch.record()}, indent=1))
    return _throttle_verdict(console, watch, 0)


def _throttle_verdict(console: Console, watch: throttle.Watch, rc: int) -> int:
    """Print the run's clock slowdown; exit 3 when the GPU throttled (thermal/power brake), else `rc`."""
    warning = watch.warning()
    seen = watch.slowdown if watch.slowdown is not None else "unknown (no nvidia-smi counters)"
    console.print(f"[red]{warning}" if warning else f"clock slowdown over the {watch.seconds:.0f} s run: {seen}")
    return 3 if warning else rc


if __name__ == "__main__":
    sys.exit(main())

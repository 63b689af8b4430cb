"""Timing primitives on triton.testing, and the bandwidth ceilings measured in the same run.

- `bench`: triton.testing.do_bench, median, L2 flushed before every run (launch overhead included).
- `bench_graph`: the same function captured in a CUDA graph and replayed (launch gaps removed).
- `bench_quantiles` / `bench_graph_quantiles` / `wall_quantiles`: p20, p50, p80 of the same timings, which
  the benchmark records keep (p50 is the median the other two return).
- `copy_gbps`: a device-to-device copy, counting bytes read plus bytes written: the roofline.
- `host_us`: wall time per call of calls issued back to back (host cost when the GPU keeps up).
- `host_us_rounds`: the same for several calls, interleaved over rounds: each call's least disturbed round (min)
  and its median round, for ratios on a shared, noisy host.
- `print_profile`: a cProfile of n calls, the functions with the most own time printed (the host-cost probes).
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time
from collections.abc import Callable

import torch
import triton.testing

WARMUP_MS = 25
REP_MS = 100
QUANTILES = (0.2, 0.5, 0.8)
Quantiles = dict[str, float]  # {"p20": ms, "p50": ms, "p80": ms}


def _named(values) -> Quantiles:
    values = [float(v) for v in values]
    if len(values) != len(QUANTILES):
        raise ValueError(f"expected {len(QUANTILES)} quantiles, got {values!r}")
    return {f"p{round(q * 100)}": v for q, v in zip(QUANTILES, values, strict=True)}


def quantiles_of(times_ms: list[float]) -> Quantiles:
    """p20/p50/p80 of raw timings, interpolated linearly like triton.testing.do_bench's `quantiles`."""
    if not times_ms:
        raise ValueError("quantiles_of: times_ms is empty")
    t = torch.tensor(times_ms, dtype=torch.float64)
    return _named(torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64)).tolist())


def bench_quantiles(fn: Callable[[], object], *, warmup: int = WARMUP_MS, rep: int = REP_MS) -> Quantiles:
    """p20/p50/p80 milliseconds of fn() with do_bench (L2 flushed between runs)."""
    return _named(triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES)))


def bench_graph_quantiles(fn: Callable[[], object], *, rep: int = REP_MS) -> Quantiles:
    """p20/p50/p80 milliseconds of fn() replayed from a CUDA graph (do_bench_cudagraph)."""
    with torch.cuda.stream(torch.cuda.Stream()):
        return _named(triton.testing.do_bench_cudagraph(fn, rep=rep, quantiles=list(QUANTILES)))


def wall_quantiles(fn: Callable[[], object], reps: int = 5) -> Quantiles:
    """p20/p50/p80 wall milliseconds of `reps` calls of fn() after one warm-up call (CPU plumbing runs)."""
    if reps < 1:
        raise ValueError(f"wall_quantiles: reps must be >= 1, got {reps}")
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return quantiles_of(times)


def bench(fn: Callable[[], object], *, warmup: int = WARMUP_MS, rep: int = REP_MS) -> float:
    """Median milliseconds of fn() with do_bench (L2 flushed between runs)."""
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def bench_graph(fn: Callable[[], object], *, rep: int = REP_MS) -> float:
    """Median milliseconds of fn() replayed from a CUDA graph (do_bench_cudagraph)."""
    with torch.cuda.stream(torch.cuda.Stream()):
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def copy_gbps(nbytes: int = 1 << 30, device: str | torch.device = "cuda") -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), random data, median of do_bench."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return gbps(2 * nbytes, ms)


def host_us(fn: Callable[[], object], n: int = 2000, warmup: int = 50) -> float:
    """Wall microseconds per call of fn() issued n times back to back, one synchronize at the end: the host
    time of a call (launch overhead), as long as each call's GPU work is shorter than that."""
    return _calls_us(fn, n, warmup, until_synced=True)


def issue_us(fn: Callable[[], object], n: int = 200, warmup: int = 50) -> float:
    """Wall microseconds per call of fn() issued n times back to back, the clock stopped before the synchronize:
    the host's time of a call even where its GPU work is longer (while n calls fit the launch queue)."""
    return _calls_us(fn, n, warmup, until_synced=False)


def _calls_us(fn: Callable[[], object], n: int, warmup: int, until_synced: bool) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if until_synced:
        torch.cuda.synchronize()
    took = time.perf_counter() - start
    torch.cuda.synchronize()
    return took / n * 1e6


def host_us_rounds(calls: dict[str, Callable[[], object]], rounds: int = 15, n: int = 200, warmup: int = 50,
                   timer: Callable[..., float] = host_us) -> dict[str, tuple[float, float]]:  # fmt: skip
    """{name: (min, median)} over `rounds` of `timer(fn, n)` per call (`host_us`, or `issue_us`), every call once a
    round in order, so a burst of host noise lands on all calls of a round rather than on one call's whole
    measurement."""
    for fn in calls.values():
        timer(fn, n=warmup, warmup=0)
    taken: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            taken[name].append(timer(fn, n=n, warmup=0))
    return {name: (min(v), statistics.median(v)) for name, v in taken.items()}


def print_profile(fn: Callable[[], object], n: int, top: int) -> pstats.Stats:
    """cProfile n calls of fn() (then a device sync where there is a GPU) and print the `top` functions by own
    time; the stats are returned for more. cProfile's own overhead inflates every figure."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(top)
    return stats

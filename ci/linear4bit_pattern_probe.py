"""How fast a GPU reads a packed 4-bit weight in the tilings linear_4bit's mma kernel could use, with no decode: a
read-only Triton kernel XORs the int32 words a program would load (ROWS W rows, SEG words a row per step, the K
range split S ways) and stores one word a row and split; beside it a contiguous 1-D read of the same bytes and a
device copy. CUDA-graph medians (tritonbits_harness.timing.bench_graph); GB/s over the words read.

    python ci/linear4bit_pattern_probe.py [--shapes KxN,...] [--rep 20]

A tiling whose plain reads run well under the 1-D read's rate caps any kernel that walks the weight that way.
Weights under the L2's size stay in it across the graph's replays (the evict-first hint notwithstanding), so those
shapes time L2 reads, as the benchmark's do.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import triton
import triton.language as tl

from tritonbits_harness import timing
from tritonbits_harness.bench.linear_4bit import parse_shapes


@triton.jit
def _tile_read_kernel(words_ptr, out_ptr, N, K_WORDS, words_per_split, ROWS: tl.constexpr, SEG: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_r * ROWS + tl.arange(0, ROWS)
    base = tl.minimum(rows, N - 1).to(tl.int64) * K_WORDS
    kw_lo = pid_s * words_per_split
    kw_hi = tl.minimum(kw_lo + words_per_split, K_WORDS)
    acc = tl.zeros((ROWS, SEG), tl.int32)
    for kw in range(kw_lo, kw_hi, SEG):
        cols = kw + tl.arange(0, SEG)
        acc ^= tl.load(words_ptr + base[:, None] + cols[None, :], mask=(cols < kw_hi)[None, :], other=0,
                       eviction_policy="evict_first")  # fmt: skip
    tl.store(out_ptr + pid_s * N + rows, tl.xor_sum(acc, axis=1), mask=rows < N)


@triton.jit
def _flat_read_kernel(words_ptr, out_ptr, total, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK * STEPS
    acc = tl.zeros((BLOCK,), tl.int32)
    for i in range(STEPS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(words_ptr + offs, mask=offs < total, other=0, eviction_policy="evict_first")
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(acc, axis=0))


TILINGS = (  # (rows a program, words a row a step, splits of K, warps): the mma kernel's is (64, 32, 8, 4)
    (64, 32, 8, 4),
    (32, 32, 8, 2),
    (128, 32, 8, 8),
    (64, 32, 1, 4),
    (16, 128, 8, 4),
    (16, 128, 2, 4),
    (8, 256, 4, 4),
    (4, 512, 2, 4),
)


def _tile_read(words, out, grid, per, rows, seg, warps):
    n, k_words = words.shape
    _tile_read_kernel[grid](words, out, n, k_words, per, ROWS=rows, SEG=seg, num_warps=warps)


def _flat_read(words, out, block, steps):
    _flat_read_kernel[(out.numel(),)](words, out, words.numel(), BLOCK=block, STEPS=steps, num_warps=8)


def probe_shape(k: int, n: int, rep: int) -> dict[str, float]:
    """us for each tiling, the 1-D read and the copy of one random [N, K/8] int32 weight."""
    k_words = k // 8
    words = torch.randint(-(2**31), 2**31 - 1, (n, k_words), dtype=torch.int32, device="cuda")
    res = {}
    for rows, seg, split, warps in TILINGS:
        per = triton.cdiv(triton.cdiv(k_words, split), seg) * seg
        s = triton.cdiv(k_words, per)
        out = torch.empty(s, n, dtype=torch.int32, device="cuda")
        fn = partial(_tile_read, words, out, (triton.cdiv(n, rows), s), per, rows, seg, warps)
        res[f"tile r{rows} seg{seg} s{split} w{warps}"] = timing.bench_graph(fn, rep=rep) * 1e3
    block, steps = 2048, 8
    flat_out = torch.empty(triton.cdiv(words.numel(), block * steps), dtype=torch.int32, device="cuda")
    res["flat 1-D read"] = timing.bench_graph(partial(_flat_read, words, flat_out, block, steps), rep=rep) * 1e3
    dst = torch.empty_like(words)
    res["copy (read + write)"] = timing.bench_graph(partial(dst.copy_, words), rep=rep) * 1e3
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="KxN,KxN,... (default: the benchmark's shapes)")
    ap.add_argument("--rep", type=int, default=20)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    for k, n in parse_shapes(args.shapes):
        res = probe_shape(k, n, args.rep)
        nbytes = n * k // 2
        flat = res["flat 1-D read"]
        print(f"K={k:5d} N={n:5d} ({nbytes / 1e6:.1f} MB):", flush=True)
        for name, us in res.items():
            print(f"    {name:28s} {us:8.2f} us {nbytes / us / 1e3:7.0f} GB/s  {flat / us:6.3f} of the 1-D read",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

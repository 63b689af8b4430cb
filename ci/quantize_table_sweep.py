"""Exhaustive CPU check of the 8-bit table encoder (tritonbits.ops.blockwise_8bit.encode_8bit_table, emulated
with the kernel's integer operations on the host) against the numpy oracle of bnb CUDA's dQuantize<0>
(tritonbits_reference.quantize_cuda.dquantize) on every fp32 bit pattern: all 2**32 of them (NaN, Inf,
denormals and |x| > 1 included), or --range=unit for the 2**31 + 2 patterns in [-1, 1].

    PYTHONPATH=packages/kernels/src:packages/reference/src python ci/quantize_table_sweep.py [--range unit]

Prints the mismatch count (0 expected) and the time taken; exits 1 on a mismatch."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from tritonbits import formats
from tritonbits.ops import blockwise_8bit as b8
from tritonbits_reference.quantize_cuda import dquantize

CHUNK = 1 << 24


def encode(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The kernel's encode_8bit_table, op for op, in torch int32."""
    key = b8.table_key(x)
    entry = table[((key >> b8.TABLE_SHIFT) + b8.TABLE_NEG).long()]
    code = (entry & 0xFF) + ((key & ((1 << b8.TABLE_SHIFT) - 1)) > (entry >> 8)).to(torch.int32)
    return torch.where(x != x, 0, code)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--range", choices=("all", "unit"), default="all")
    args = parser.parse_args()
    table = b8.dynamic_table()
    code = formats.dynamic_code().numpy()
    # unit: [+0, 1.0] and [-0, -1.0] by bit pattern
    unit = [(0, 0x3F800001), (0x80000000, 0x80000000 + 0x3F800001)]
    spans = [(0, 1 << 32)] if args.range == "all" else unit
    start, bad, done = time.perf_counter(), 0, 0
    total = sum(b - a for a, b in spans)
    for lo, hi in spans:
        for s in range(lo, hi, CHUNK):
            e = min(s + CHUNK, hi)
            bits = torch.arange(s, e, dtype=torch.int64).to(torch.int32)  # wraps to the int32 bit pattern
            x = bits.view(torch.float32)
            got = encode(x, table).numpy()
            with np.errstate(invalid="ignore"):
                want = dquantize(code, x.numpy()).astype(np.int32)
            miss = np.nonzero(got != want)[0]
            if miss.size:
                bad += miss.size
                i = miss[0]
                print(f"MISMATCH bits=0x{(s + i) & 0xFFFFFFFF:08x} x={x[i].item()!r} table={got[i]} oracle={want[i]}")
            done += e - s
            if (s // CHUNK) % 32 == 0:
                print(f"{done / total:6.1%} {bad} mismatches, {time.perf_counter() - start:.0f} s", flush=True)
    print(f"{done} patterns, {bad} mismatches, {time.perf_counter() - start:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

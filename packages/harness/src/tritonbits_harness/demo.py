"""The tritonbits demo: quantize a real bitsandbytes Linear4bit, dequantize it with tritonbits, check it is
bit-exact, and show the speed (GPU) or the interpreter result (CPU).

    uv run python -m tritonbits_harness.demo [--in-features 4096 --out-features 14336 --dtype bf16]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before tritonbits is imported

from rich.console import Console
from rich.table import Table

from . import gpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tritonbits-demo", description=__doc__)
    parser.add_argument("--in-features", type=int, default=None)
    parser.add_argument("--out-features", type=int, default=None)
    parser.add_argument("--dtype", choices=sorted(gpus.DTYPES), default="bf16")
    parser.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    args = parser.parse_args(argv)
    console = Console()

    import bitsandbytes.functional as F

    import tritonbits
    import tritonbits_reference as R
    from tritonbits_reference import baselines
    from tritonbits_reference import bnb as RB

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    k = args.in_features or (4096 if on_gpu else 256)
    n = args.out_features or (14336 if on_gpu else 192)
    dtype = gpus.DTYPES[args.dtype]
    layer = RB.linear4bit(k, n, dtype=dtype, quant_type=args.quant_type, device=device)
    weight: Any = layer.weight  # a bnb Params4bit (carries .quant_state)
    console.print(f"bnb Linear4bit({k}, {n}), {args.quant_type}, nested absmax, {args.dtype} on "
                  f"{torch.cuda.get_device_name() if on_gpu else 'CPU (Triton interpreter)'}")  # fmt: skip

    ours = tritonbits.dequantize_4bit(weight)
    theirs = F.dequantize_4bit(weight.data, weight.quant_state).reshape(ours.shape)
    oracle = R.dequantize_4bit(weight.data, weight.quant_state)
    exact_bnb = torch.equal(ours, theirs.to(ours.device))
    exact_oracle = torch.equal(ours.cpu(), oracle)
    console.print(f"tritonbits == bitsandbytes: {exact_bnb}   tritonbits == numpy oracle: {exact_oracle}")
    if not on_gpu:
        console.print("CPU: the kernel ran through the Triton interpreter (no timing: it measures nothing).")
        return 0 if exact_bnb and exact_oracle else 1

    from . import timing

    nbytes = weight.data.numel() + weight.quant_state.absmax.numel() + ours.numel() * ours.element_size()
    providers = {
        "tritonbits (1 launch)": lambda: tritonbits.dequantize_4bit(weight),
        "bitsandbytes": lambda: F.dequantize_4bit(weight.data, weight.quant_state),
        "unsloth-style": lambda: baselines.unsloth_fast_dequantize(weight.data, weight.quant_state),
    }
    copy = timing.copy_gbps(1 << 30)
    table = Table(title=f"dequantize {k}x{n} (CUDA-graph median; copy {copy:.0f} GB/s)")
    for col in ("provider", "us", "GB/s", "% of copy"):
        table.add_column(col)
    for name, fn in providers.items():
        ms = timing.bench_graph(fn)
        gbps = timing.gbps(nbytes, ms)
        table.add_row(name, f"{ms * 1e3:.1f}", f"{gbps:.0f}", f"{100 * gbps / copy:.0f}")
    console.print(table)
    return 0 if exact_bnb and exact_oracle else 1


if __name__ == "__main__":
    sys.exit(main())

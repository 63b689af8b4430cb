# ruff: noqa: B023  (a probe script: every lambda is used in the iteration that makes it)
"""Does a GPU family without a linear_4bit table of its own do better with another family's table
(configs.FALLBACK_FAMILY) than with the heuristic? One GPU call (issue 12, the H200 vs the H100 table).

    python ci/linear4bit_family_probe.py [--table h100] [--rep 20]

Per point (M in 1..256 x (K, N) in the issue's shapes; x bf16, weight nf4 nested blocksize 64 quantized by bnb):
the table's config for the point's key (`linear_4bit.config_key`) and `heuristic_config` are each checked
against the float64 product under the K-aware policy (tolerance.assert_matmul), then timed side by side in one
process with triton.testing.do_bench_cudagraph (median, µs), with bnb.matmul_4bit for context. Prints one line
a point: the table's path and time, the heuristic's, their ratio (heuristic / table: > 1 means the table is
faster), and x bnb of each; points where both pick the same config are timed once.
"""

from __future__ import annotations

import argparse

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch

import tritonbits
from tritonbits import configs
from tritonbits.ops import linear_4bit as L
from tritonbits_harness import timing
from tritonbits_harness.tolerance import assert_matmul

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (8192, 28672)]  # (K, N)
MS = [1, 2, 4, 8, 16, 32, 64, 256]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", default="h100", help="the family whose linear_4bit entries are tried")
    ap.add_argument("--rep", type=int, default=20, help="do_bench_cudagraph rep (ms)")
    args = ap.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    entries = configs.table("linear_4bit").get(args.table, {})
    print(f"{torch.cuda.get_device_name(dev)} ({sms} SMs), family {configs._runtime.gpu_family(dev)}; "
          f"{args.table} table: {len(entries)} entries; rep {args.rep} ms")  # fmt: skip
    wins = []
    for k, n in SHAPES:
        w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        prepared = L._prepare(q, state)
        wd = tritonbits.dequantize_4bit(q, state)
        for m in MS:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            key = L.config_key(x.dtype, m, n, k)
            tab = entries.get(key)
            heu = L.heuristic_config(x.dtype, m, n, k, sms)
            times = {}
            for name, cfg in (("table", tab), ("heuristic", heu)):
                if cfg is None:
                    continue
                if name == "heuristic" and cfg == tab:
                    times[name] = times["table"]
                    continue
                assert_matmul(L.forward_2d(x, prepared, None, config=cfg)[:8], x[:8], wd)
                times[name] = timing.bench_graph(lambda cfg=cfg: L.forward_2d(x, prepared, None, config=cfg),
                                                 rep=args.rep) * 1e3  # fmt: skip
            t_bnb = timing.bench_graph(lambda: bnb.matmul_4bit(x, q.t(), quant_state=state), rep=args.rep) * 1e3
            line = f"K={k:5d} N={n:5d} M={m:3d} {key:24s}"
            if "table" in times:
                line += f" table {tab['path']:7s} {times['table']:8.1f} us (x bnb {t_bnb / times['table']:.2f})"
            line += (
                f" | heuristic {heu['path']:7s} {times['heuristic']:8.1f} us (x bnb {t_bnb / times['heuristic']:.2f})"
            )
            if "table" in times:
                ratio = times["heuristic"] / times["table"]
                wins.append(ratio)
                line += f" | heuristic/table {ratio:.3f}"
            print(line, flush=True)
    if wins:
        wins.sort()
        print(f"heuristic/table over {len(wins)} points: min {wins[0]:.3f}, median {wins[len(wins) // 2]:.3f}, "
              f"max {wins[-1]:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()

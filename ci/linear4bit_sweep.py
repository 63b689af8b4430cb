# ruff: noqa: B023, SIM115  (a probe script: every lambda is used in the iteration that makes it)
"""One GPU call for tritonbits.linear_4bit: config sweep (correctness-checked), baselines, proposed table.

    python ci/linear4bit_sweep.py [--budget-s 240] [--out DIR] [--points quick|full]

Per sweep point (x bf16, nf4 nested blocksize 64, the issue's shapes): every candidate config is checked
against the float64 product of bnb's dequantized weight under the K-aware policy (on the GPU), then timed
with triton.testing.do_bench_cudagraph; baselines bnb.matmul_4bit, dequantize_4bit + F.linear and dense
F.linear on the bf16 weight; GB/s over the packed bytes + absmax and % of a device copy measured here.
Writes sweep.txt (every timing) and table.json (the best config per key) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

import tritonbits
from tritonbits.ops import linear_4bit as L

START = time.time()
# (M, K, N), most important first: the sweep stops at its time budget
POINTS_FULL = [(1, 4096, 14336), (16, 4096, 14336), (256, 4096, 14336), (4, 4096, 14336), (64, 4096, 14336),
               (1, 14336, 4096), (1024, 4096, 14336), (1, 4096, 4096), (1, 8192, 28672), (2, 4096, 14336),
               (8, 4096, 14336), (16, 14336, 4096), (32, 4096, 14336), (128, 4096, 14336)]  # fmt: skip
POINTS_QUICK = [(1, 4096, 14336), (16, 4096, 14336), (256, 4096, 14336)]


def log(fh, *a):
    line = " ".join(str(x) for x in a)
    print(line, flush=True)
    fh.write(line + "\n")
    fh.flush()


def copy_gbps() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench_cudagraph(lambda: b.copy_(a), rep=50)
    return 2 * a.numel() / ms * 1e-6


def packed_bytes(n: int, k: int) -> int:
    """packed 0.5 byte per weight + nested absmax (1 byte per 64) + absmax2 (4 bytes per 64*256)."""
    return n * k // 2 + n * k // 64 + 4 * -(-n * k // (64 * 256))


def within_policy(out, x, w, bias=None) -> float:
    """max |out - ref| / bound on the GPU in float64 (<= 1 passes): tolerance.matmul_bound's formula."""
    from tritonbits_harness.tolerance import MATMUL_FP32_ACC as tol
    from tritonbits_harness.tolerance import ulp

    k = x.shape[-1]
    xd, wd = x.double(), w.double()
    ref = xd @ wd.T
    mag = xd.abs() @ wd.abs().T
    if bias is not None:
        ref, mag = ref + bias.double(), mag + bias.double().abs()
    bound = tol.k_factor * (k + tol.fp32_terms) * 2.0**-24 * mag + tol.ulps * ulp(out, out.dtype).to(out.device)
    err = (out.double() - ref).abs()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((err / bound).max())


def candidates(m: int, n: int, k: int, sms: int) -> list[dict]:
    from tritonbits_harness.tune import linear_4bit_candidates

    return linear_4bit_candidates(m, n, k, sms)


def split_variants(cfg: dict) -> list[dict]:
    if cfg["path"] not in ("gemv", "gemm"):
        return []
    out = [{**cfg, "pair": not cfg["pair"]}]
    for split in (1, 2, 4, 8, 16):
        if split != cfg["split_k"]:
            out.append({**cfg, "split_k": split})
    for stages in (2, 4):
        out.append({**cfg, "stages": stages})
    return out


def qlora(fh, summary: list[str]) -> None:
    """The QLoRA MLP block of the benchmark (gate/up/down nf4 + bf16 LoRA r=16), forward + backward, do_bench
    (launches included), ours vs bnb, at 1024 and 4096 tokens."""
    from tritonbits_harness.bench import linear_4bit as B

    for tokens in (1024, 4096):
        try:
            thunks = B.qlora_setup({"tokens": tokens, **B.QLORA}, torch.device("cuda"))
            times = {name: do_bench(fn, rep=100) for name, fn in thunks.items()}
        except Exception as exc:
            log(fh, f"QLoRA tokens={tokens} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        row = (f"QLoRA MLP fwd+bwd tokens={tokens}: tritonbits {times['tritonbits'] * 1e3:.0f} us, bnb "
               f"{times['bnb'] * 1e3:.0f} us ({times['bnb'] / times['tritonbits']:.2f}x)")  # fmt: skip
        log(fh, row)
        summary.append(row)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/linear4bit"))
    ap.add_argument("--points", default="full", choices=("quick", "full"))
    ap.add_argument("--rep", type=int, default=15)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    fh = open(os.path.join(args.out, "sweep.txt"), "w")
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    log(fh, f"device {torch.cuda.get_device_name(dev)} sms {sms} torch {torch.__version__} triton {triton.__version__} "
            f"bnb {bnb.__version__}")  # fmt: skip
    cp = copy_gbps()
    log(fh, f"device-to-device copy: {cp:.0f} GB/s (bytes read + written)")
    points = POINTS_FULL if args.points == "full" else POINTS_QUICK
    table: dict[str, dict] = {}
    summary = []
    weights: dict = {}
    for index, (m, k, n) in enumerate(points):
        if index == 3:
            qlora(fh, summary)
        if time.time() - START > args.budget_s:
            log(fh, f"budget reached: skipping M={m} K={k} N={n} and later points")
            break
        if (k, n) not in weights:
            weights.clear()
            torch.cuda.empty_cache()
            wf = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
            q, st = F.quantize_4bit(wf, blocksize=64, quant_type="nf4", compress_statistics=True)
            weights[(k, n)] = (wf, q, st, F.dequantize_4bit(q, st))
        wf, q, st, wd = weights[(k, n)]
        x = torch.randn(m, k, device=dev).to(torch.bfloat16)
        prepared = L._prepare(q, st)
        nbytes = packed_bytes(n, k)
        gb = lambda ms: nbytes / ms * 1e-6
        base = {
            "bnb.matmul_4bit": lambda: bnb.matmul_4bit(x, q.t(), quant_state=st),
            "dequant+F.linear": lambda: torch.nn.functional.linear(x, tritonbits.dequantize_4bit(q, st)),
            "dense F.linear": lambda: torch.nn.functional.linear(x, wf),
        }
        base_ms = {name: do_bench_cudagraph(fn, rep=args.rep) for name, fn in base.items()}
        results = []

        def run(cfg):
            fn = lambda: L.forward_2d(x, prepared, None, config=cfg)
            try:
                out = fn()
                ratio = within_policy(out, x, wd)
                if ratio > 1:
                    log(fh, f"  WRONG {cfg}: error/bound {ratio:.3g}")
                    return None
                ms = do_bench_cudagraph(fn, rep=args.rep)
            except Exception as exc:  # a config that does not compile or launch: logged, skipped
                log(fh, f"  FAILED {cfg}: {type(exc).__name__}: {str(exc)[:200]}")
                return None
            results.append((ms, cfg))
            log(fh, f"  {ms * 1e3:8.1f} us {gb(ms):6.0f} GB/s {100 * gb(ms) / cp:5.1f}%  err/bound {ratio:.2f}  {cfg}")
            return ms

        log(fh, f"M={m} K={k} N={n}: " + ", ".join(f"{k_} {v * 1e3:.1f} us" for k_, v in base_ms.items()))
        for cfg in candidates(m, n, k, sms):
            run(cfg)
        if results:
            best = min(results, key=lambda r: r[0])[1]
            for cfg in split_variants(best):
                run(cfg)
        heur = L.heuristic_config(torch.bfloat16, m, n, k, sms)
        heur_ms = run(heur)
        if not results:
            continue
        best_ms, best = min(results, key=lambda r: r[0])
        table[L.config_key(torch.bfloat16, m, n, k)] = best
        eager_ms = do_bench(lambda: tritonbits.linear_4bit(x, q, st), rep=args.rep)
        bnb_eager_ms = do_bench(base["bnb.matmul_4bit"], rep=args.rep)
        row = (f"M={m:5d} K={k:5d} N={n:5d} | best {best_ms * 1e3:7.1f} us {gb(best_ms):5.0f} GB/s "
               f"{100 * gb(best_ms) / cp:4.1f}% | heur {heur_ms * 1e3 if heur_ms else float('nan'):7.1f} | "
               f"bnb {base_ms['bnb.matmul_4bit'] * 1e3:7.1f} ({base_ms['bnb.matmul_4bit'] / best_ms:4.2f}x) | "
               f"dq+lin {base_ms['dequant+F.linear'] * 1e3:7.1f} ({base_ms['dequant+F.linear'] / best_ms:4.2f}x) | "
               f"dense {base_ms['dense F.linear'] * 1e3:7.1f} ({base_ms['dense F.linear'] / best_ms:4.2f}x) | "
               f"launch incl.: ours {eager_ms * 1e3:6.1f} bnb {bnb_eager_ms * 1e3:6.1f} | {best}")  # fmt: skip
        summary.append(row)
        log(fh, "BEST " + row)
    with open(os.path.join(args.out, "table.json"), "w") as t:
        json.dump(table, t, indent=1, sort_keys=True)
    log(fh, "\n==== summary (CUDA-graph medians; GB/s over packed weight + absmax; x bf16, nf4 nested bs64) ====")
    for row in summary:
        log(fh, row)
    log(fh, "table.json: " + json.dumps(table, sort_keys=True))
    log(fh, f"elapsed {time.time() - START:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

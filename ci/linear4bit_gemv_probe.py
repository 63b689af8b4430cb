# ruff: noqa: B023, SIM115  (a probe script: every lambda is used in the iteration that makes it)
"""One GPU call for linear_4bit's decode path "gemv2" (issue 12): correctness, candidates, baselines, table.

    python ci/linear4bit_gemv_probe.py --out DIR --budget-s 200       # GPU
    python ci/linear4bit_gemv_probe.py --dry-run --out DIR            # CPU: interpreter, tiny shapes, no timing

Per point (M in 1, 2, 4, 8, 16 x (K, N) in the issue's shapes; x bf16, nf4 nested blocksize 64, most important
first: the probe stops at its time budget): the heuristic's gemv2 config is checked against the float64 product
of the dequantized weight under the K-aware policy (tolerance.MATMUL_FP32_ACC) and compared with the old gemv
path (torch.equal where the summation order is the same, which it is not: the max |difference| is reported);
then a few gemv2 candidates (each checked before it is timed; a failing one is logged and skipped), the old gemv
path's config (the table's, else its heuristic), bnb.matmul_4bit and a device copy of the same bytes are timed
with triton.testing.do_bench_cudagraph. GB/s over the packed weight + absmax; % of copy: that over a 1 GiB
device-to-device copy's GB/s (bytes read + written), as ci/linear4bit_sweep.py and the issue count it.
Writes probe.txt (every line), results.json (every timing) and table.json (the best config per key) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

START = time.time()
SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (8192, 28672)]  # (K, N)
MS = [1, 2, 4, 8, 16]
DRY_SHAPES = [(256, 96), (512, 40)]
DRY_MS = [1, 3, 16]


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/linear4bit_gemv"))
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--rep", type=int, default=20, help="do_bench_cudagraph rep (ms)")
    ap.add_argument("--dry-run", action="store_true", help="CPU: Triton interpreter, tiny shapes, no timing")
    ap.add_argument("--max-candidates", type=int, default=24)
    return ap.parse_args()


ARGS = parse()
if ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit decorates: before tritonbits is imported

import torch  # noqa: E402
import triton  # noqa: E402

from tritonbits.ops import linear_4bit as L  # noqa: E402

os.makedirs(ARGS.out, exist_ok=True)
FH = open(os.path.join(ARGS.out, "probe.txt"), "w")


def log(*a) -> None:
    line = " ".join(str(x) for x in a)
    print(line, flush=True)
    FH.write(line + "\n")
    FH.flush()


def elapsed() -> float:
    return time.time() - START


def packed_bytes(n: int, k: int) -> int:
    """packed 0.5 byte per weight + nested absmax (1 byte per 64) + absmax2 (4 bytes per 64*256)."""
    return n * k // 2 + n * k // 64 + 4 * -(-n * k // (64 * 256))


def oracle(x, wd64, wd64_abs):
    """(float64 x @ W.T, |x| @ |W|.T): the reference and the magnitude the policy's bound scales with."""
    xd = x.double()
    return xd @ wd64.T, xd.abs() @ wd64_abs.T


def within_policy(out, k: int, ref, mag) -> float:
    """max |out - ref| / bound in float64 (<= 1 passes): tolerance.matmul_bound's formula, on out's device."""
    from tritonbits_harness.tolerance import MATMUL_FP32_ACC as tol
    from tritonbits_harness.tolerance import ulp

    if not torch.isfinite(out).all():
        return float("inf")
    bound = tol.k_factor * (k + tol.fp32_terms) * 2.0**-24 * mag + tol.ulps * ulp(out, out.dtype).to(out.device)
    return float(((out.double() - ref).abs() / bound).max())


def bench(fn, rep: int) -> float:
    """ms: CUDA-graph median on a GPU; one timed call under the interpreter (the dry run checks plumbing only)."""
    if ARGS.dry_run:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=rep)


def copy_gbps(device) -> float:
    if ARGS.dry_run:
        return float("nan")
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), 50)
    return 2 * (1 << 30) / ms * 1e-6


def quantize(wf, device):
    """(packed, quant_state, exact dequantized weight): bnb's; the numpy oracle's weight in the dry run (CPU)."""
    import bitsandbytes.functional as F

    q, st = F.quantize_4bit(wf, blocksize=64, quant_type="nf4", compress_statistics=True)
    if ARGS.dry_run:
        import tritonbits_reference as R

        return q, st, R.dequantize_4bit(q, st).reshape(wf.shape)
    return q, st, F.dequantize_4bit(q, st)


def candidates(m: int, n: int, k: int, sms: int) -> list[dict]:
    from tritonbits_harness.tune import gemv2_candidates

    heur = L.heuristic_config(torch.bfloat16, m if m <= 4 else 4, n, k, sms)
    out = [heur] if heur["path"] == "gemv2" else []
    for cfg in gemv2_candidates(m, n, k, sms):
        if cfg not in out:
            out.append(cfg)
    return out[: ARGS.max_candidates]


def old_gemv_config(m: int, n: int, k: int, device) -> dict:
    cfg = L.config_for(device, torch.bfloat16, m, n, k)
    if cfg.get("path") == "gemv":
        return cfg
    return L.heuristic_gemv_config(torch.bfloat16, m, n, k, L._sm_count(device))


def main() -> int:
    device = torch.device("cpu" if ARGS.dry_run else "cuda")
    shapes, ms_list = (DRY_SHAPES, DRY_MS) if ARGS.dry_run else (SHAPES, MS)
    if ARGS.dry_run:
        sms, bnb_version, name = 4, "-", "cpu (interpreter, dry run)"
    else:
        import bitsandbytes as bnb

        sms = torch.cuda.get_device_properties(device).multi_processor_count
        bnb_version, name = bnb.__version__, torch.cuda.get_device_name(device)
    log(f"device {name} sms {sms} torch {torch.__version__} triton {triton.__version__} bnb {bnb_version} "
        f"budget {ARGS.budget_s:.0f} s")  # fmt: skip
    cp = copy_gbps(device)
    log(f"device-to-device copy (1 GiB): {cp:.0f} GB/s (bytes read + written)")
    points = [(m, k, n) for m in ms_list for (k, n) in shapes]
    results: list[dict] = []
    table: dict[str, dict] = {}
    summary: list[str] = []
    weights: dict = {}
    for index, (m, k, n) in enumerate(points):
        if elapsed() > ARGS.budget_s:
            log(f"budget reached at {elapsed():.0f} s: skipping {len(points) - index} points from M={m} K={k} N={n}")
            break
        log(f"[{index + 1}/{len(points)} {elapsed():.0f}s] M={m} K={k} N={n}")
        try:
            if (k, n) not in weights:
                weights.clear()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                gen = torch.Generator().manual_seed(k * 7 + n)
                wf = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16).to(device)
                q, st, wd = quantize(wf, device)
                del wf
                wd64 = wd.double()
                weights[(k, n)] = (q, st, wd64, wd64.abs())
            q, st, wd64, wd64_abs = weights[(k, n)]
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).to(device)
            ref, mag = oracle(x, wd64, wd64_abs)
            prepared = L._prepare(q, st)
        except Exception as exc:
            log(f"  SETUP FAILED: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        nbytes = packed_bytes(n, k)
        gbps = lambda ms: nbytes / ms * 1e-6
        row: dict = {"m": m, "k": k, "n": n, "bytes": nbytes, "copy_gbps": cp, "candidates": []}

        # correctness: the heuristic's gemv2 config against the oracle and against the old gemv path
        old_cfg = old_gemv_config(m, n, k, device)
        try:
            new_out = L.forward_2d(x, prepared, None, config=candidates(m, n, k, sms)[0])
            old_out = L.forward_2d(x, prepared, None, config=old_cfg)
            ratio_new, ratio_old = within_policy(new_out, k, ref, mag), within_policy(old_out, k, ref, mag)
            equal = bool(torch.equal(new_out, old_out))
            diff = float((new_out.float() - old_out.float()).abs().max())
            row.update(
                {"err_bound_new": ratio_new, "err_bound_old": ratio_old, "equal_old": equal, "max_diff_old": diff}
            )
            log(
                f"  check: gemv2 err/bound {ratio_new:.3f} ({'ok' if ratio_new <= 1 else 'WRONG'}), old gemv "
                f"{ratio_old:.3f}; torch.equal(gemv2, gemv) {equal} (not required: summation orders differ), "
                f"max |diff| {diff:.3g}"
            )
        except Exception as exc:
            log(f"  CHECK FAILED: {type(exc).__name__}: {str(exc)[:300]}")
            log("  " + traceback.format_exc().replace("\n", "\n  ")[-1500:])

        # baselines
        base: dict = {}
        if not ARGS.dry_run:
            import bitsandbytes as bnb

            src = torch.empty(nbytes, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            base_fns = {"bnb.matmul_4bit": lambda: bnb.matmul_4bit(x, q.t(), quant_state=st),
                        "copy same bytes": lambda: dst.copy_(src)}  # fmt: skip
            for label, fn in base_fns.items():
                try:
                    base[label] = bench(fn, ARGS.rep)
                except Exception as exc:
                    log(f"  {label} FAILED: {type(exc).__name__}: {str(exc)[:200]}")
        bnb_ms = base.get("bnb.matmul_4bit", float("nan"))
        row["baselines_ms"] = base

        def run(label: str, cfg: dict) -> float | None:
            fn = lambda: L.forward_2d(x, prepared, None, config=cfg)
            try:
                ratio = within_policy(fn(), k, ref, mag)
                if ratio > 1:
                    log(f"  WRONG {label} {cfg}: error/bound {ratio:.3g}")
                    return None
                ms = bench(fn, ARGS.rep)
            except Exception as exc:  # a config that does not compile, launch or fit: logged, skipped
                log(f"  FAILED {label} {cfg}: {type(exc).__name__}: {str(exc)[:200]}")
                return None
            row["candidates"].append({"label": label, "cfg": cfg, "ms": ms, "err_bound": ratio})
            log(
                f"  {label:6s} {ms * 1e3:8.1f} us {gbps(ms):6.0f} GB/s {100 * gbps(ms) / cp:5.1f}% "
                f"x bnb {bnb_ms / ms:5.2f}  err/bound {ratio:.2f}  {cfg}"
            )
            return ms

        old_ms = run("gemv", old_cfg)
        best: tuple[float, dict] | None = None
        for cfg in candidates(m, n, k, sms):
            if elapsed() > ARGS.budget_s + 20:
                log("  budget: candidates cut short")
                break
            ms = run("gemv2", cfg)
            if ms is not None and (best is None or ms < best[0]):
                best = (ms, cfg)
        results.append(row)
        if best is None:
            summary.append(f"M={m:3d} K={k:5d} N={n:5d} | no gemv2 result")
            continue
        best_ms, best_cfg = best
        table[L.config_key(torch.bfloat16, m, n, k)] = best_cfg
        copy_same = base.get("copy same bytes", float("nan"))
        line = (f"M={m:3d} K={k:5d} N={n:5d} | gemv2 {best_ms * 1e3:7.1f} us {gbps(best_ms):5.0f} GB/s "
                f"{100 * gbps(best_ms) / cp:5.1f}% copy | x bnb {bnb_ms / best_ms:5.2f} (bnb {bnb_ms * 1e3:6.1f} us) | "
                f"old gemv {old_ms * 1e3 if old_ms else float('nan'):7.1f} us | copy same bytes "
                f"{copy_same * 1e3:6.1f} us | {best_cfg}")  # fmt: skip
        summary.append(line)
        log("BEST " + line)
        with open(os.path.join(ARGS.out, "results.json"), "w") as fh:
            json.dump(results, fh, indent=1)
        with open(os.path.join(ARGS.out, "table.json"), "w") as fh:
            json.dump(table, fh, indent=1, sort_keys=True)
    log("\n==== summary (CUDA-graph medians; GB/s over packed weight + absmax; x bf16, nf4 nested bs64) ====")
    log("targets: M=1 >= 75% of copy and >= 2x bnb; M=2-16 >= 65% of copy and >= 3x bnb")
    for line in summary:
        log(line)
    log("table.json: " + json.dumps(table, sort_keys=True))
    with open(os.path.join(ARGS.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    with open(os.path.join(ARGS.out, "table.json"), "w") as fh:
        json.dump(table, fh, indent=1, sort_keys=True)
    log(f"elapsed {elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

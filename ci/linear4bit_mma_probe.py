"""linear_4bit's "mma" kernel (per-block tables, byte-permute decode, mma.sync) against the op's current path and
bnb.matmul_4bit on one GPU: every candidate's output is checked against the K-aware policy first, then timed
(CUDA-graph medians, tritonbits_harness.timing.bench_graph); one line per (shape, M, dtype, candidate).

    python ci/linear4bit_mma_probe.py [--shapes KxN,...] [--ms 1,4,16] [--dtypes bf16] [--warps 2,4,8]
        [--splits 1,2,4,8,16] [--prefetch 1] [--baseline FILE] [--parts] [--rep 20] [--no-bnb] [--check-only]
        [--json PATH]

--check-only runs the correctness cases only (fp16/bf16, nf4/fp4, nested or not, blocksizes 64/128/256, odd M
and N, bias, a strided x), no timing. --baseline FILE also times another linear_4bit_mma.py with the same kernel
arguments (`git show REV:packages/kernels/src/tritonbits/ops/linear_4bit_mma.py > FILE`, the working tree then
holding a variant) at the same configs, so a kernel change is compared with its base in one run. --parts times,
for the best mma config of each case, its mma kernel alone and its split-K reduction alone (buffers made outside
the graph).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import time
from functools import partial

import torch

import tritonbits
from tritonbits.ops import linear_4bit as L
from tritonbits.quant_state import prepare
from tritonbits_harness import timing
from tritonbits_harness.bench.linear_4bit import parse_shapes
from tritonbits_harness.tolerance import assert_matmul

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _weight(n, k, dtype, gen, bs=64, qt="nf4", nested=True):
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(dtype)
    packed, qs = tritonbits.quantize_4bit(w, blocksize=bs, quant_type=qt, compress_statistics=nested)
    return w, packed, qs


def check_cases(gen) -> int:
    """Correctness of the mma path on varied problems (each against the K-aware policy); returns failures."""
    fails = 0
    cases = []
    for dname in ("bf16", "fp16"):
        for qt in ("nf4", "fp4"):
            for nested in (True, False):
                for bs in (64, 128, 256):
                    cases.append((dname, qt, nested, bs, 3, 1000, 512, False, False))
    cases += [("bf16", "nf4", True, 64, m, 4096, 1024, True, False) for m in (1, 2, 5, 8, 9, 16)]
    cases += [("fp16", "nf4", True, 64, m, 1000, 768, True, True) for m in (1, 7, 13)]
    cases += [
        ("bf16", "nf4", True, 64, 4, 77, 256, False, False),
        ("bf16", "nf4", True, 64, 1, 4097, 2048, True, False),
    ]
    for dname, qt, nested, bs, m, n, k, with_bias, strided in cases:
        dtype = DTYPES[dname]
        _, packed, qs = _weight(n, k, dtype, gen, bs, qt, nested)
        pw, wd = prepare(packed, qs), tritonbits.dequantize_4bit(packed, qs)
        if strided:  # rows of x inside a wider buffer (row stride != K, still even and 16-byte aligned)
            x = torch.randn(m, k + 64, device="cuda", dtype=dtype, generator=gen)[:, :k]
        else:
            x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
        bias = torch.randn(n, device="cuda", dtype=dtype, generator=gen) if with_bias else None
        name = f"{dname} {qt} nested={nested} bs{bs} M={m} N={n} K={k} bias={with_bias} strided={strided}"
        if not L.mma_ok(pw, x, x.device):
            print(f"check {name}: mma_ok refused", flush=True)
            fails += 1
            continue
        for warps, split in ((4, 1), (2, 2), (8, 3)):
            cfg = {"path": "mma", "warps": warps, "split_k": split, "prefetch": split != 3}
            try:
                y = L.forward_2d(x, pw, bias, config=cfg)
                assert_matmul(y, x, wd, bias)
            except Exception as exc:  # a probe: log and go on
                print(f"check {name} {cfg}: FAIL {type(exc).__name__}: {str(exc)[:400]}", flush=True)
                fails += 1
                continue
        print(f"check {name}: ok", flush=True)
    return fails


def load_baseline(path: str):
    """Another linear_4bit_mma.py as a module, with a launcher registered for its kernel."""
    spec = importlib.util.spec_from_file_location("linear_4bit_mma_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    L._LAUNCHERS[mod.linear_4bit_mma_kernel] = L.CachedLauncher(mod.linear_4bit_mma_kernel)
    return mod


_MMA_LAUNCHES = L._mma_launches


@contextlib.contextmanager
def kernel_of(mod):
    """linear_4bit's mma launches take `mod`'s kernel (the same arguments) inside the block."""

    def launches_of(x2, w, bias, out, cfg):
        launches, ws = _MMA_LAUNCHES(x2, w, bias, out, cfg)
        launches[0] = launches[0]._replace(fn=mod.linear_4bit_mma_kernel)
        return launches, ws

    L._mma_launches = launches_of
    try:
        yield
    finally:
        L._mma_launches = _MMA_LAUNCHES


def with_kernel_of(mod, fn):
    def run():
        with kernel_of(mod):
            return fn()

    return run


def parts(x, pw, cfg, rep):
    """(mma kernel alone, split-K reduction alone) in us for one config, buffers allocated outside the graph."""
    out = torch.empty(x.shape[0], pw.state.shape[0], device="cuda", dtype=x.dtype)
    launches, _ws = L.fused_launches(x, pw, None, out, cfg, True)
    times = [timing.bench_graph(partial(L._launch, launch, x.device, None, True), rep=rep) * 1e3
             for launch in launches]  # fmt: skip
    return times + [float("nan")] * (2 - len(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="KxN,KxN,... (default: the benchmark's shapes)")
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--dtypes", default="bf16")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--splits", default="1,2,4,8,16")
    ap.add_argument("--prefetch", default="1")
    ap.add_argument("--baseline", default=None, help="another linear_4bit_mma.py, timed at the same configs")
    ap.add_argument("--parts", action="store_true")
    ap.add_argument("--rep", type=int, default=20)
    ap.add_argument("--no-bnb", action="store_true")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base = load_baseline(args.baseline) if args.baseline else None
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()} triton mma AVAILABLE={L.mma4.AVAILABLE}", flush=True)
    if not args.skip_check:
        fails = check_cases(gen)
        print(f"checks: {fails} failures", flush=True)
        if args.check_only:
            raise SystemExit(1 if fails else 0)
    rows = []
    t_start = time.time()
    for k, n in parse_shapes(args.shapes):
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            w, packed, qs = _weight(n, k, dtype, gen)
            pw, wd = prepare(packed, qs), tritonbits.dequantize_4bit(packed, qs)
            if not args.no_bnb:
                import bitsandbytes as bnb
                import bitsandbytes.functional as F

                bq, bstate = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            for m in (int(v) for v in args.ms.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
                fns = [("op", None, partial(tritonbits.linear_4bit, x, packed, qs))]
                for warps in (int(v) for v in args.warps.split(",")):
                    for split in (int(v) for v in args.splits.split(",")):
                        if split > k // 256:
                            continue
                        for pf in (int(v) for v in args.prefetch.split(",")):
                            cfg = {"path": "mma", "warps": warps, "split_k": split, "prefetch": bool(pf)}
                            try:
                                y = L.forward_2d(x, pw, None, config=cfg)
                                assert_matmul(y, x, wd)
                            except Exception as exc:  # a probe: log and go on
                                print(f"K={k} N={n} M={m} {dname} {cfg}: {type(exc).__name__}: {str(exc)[:300]}",
                                      flush=True)  # fmt: skip
                                continue
                            fns.append((f"mma w{warps} s{split} pf{pf}", cfg,
                                        partial(L.forward_2d, x, pw, None, config=cfg)))  # fmt: skip
                            if base is not None:
                                fn = with_kernel_of(base, partial(L.forward_2d, x, pw, None, config=cfg))
                                assert_matmul(fn(), x, wd)
                                fns.append((f"base w{warps} s{split} pf{pf}", cfg, fn))
                if not args.no_bnb:
                    fns.append(("bnb", None, partial(bnb.matmul_4bit, x, bq.t(), quant_state=bstate)))
                res = {}
                for name, cfg, fn in fns:
                    t = timing.bench_graph(fn, rep=args.rep) * 1e3
                    res[name] = t
                    rows.append({"k": k, "n": n, "m": m, "dtype": dname, "name": name, "config": cfg, "us": t})
                best = min((v, nm) for nm, v in res.items() if nm.startswith("mma"))
                best_base = min(((v, nm) for nm, v in res.items() if nm.startswith("base")), default=None)
                line = " ".join(f"{nm}={v:.2f}" for nm, v in res.items())
                print(f"K={k:5d} N={n:5d} M={m:2d} {dname}: best {best[1]} {best[0]:.2f} us | op {res['op']:.2f}"
                      + (f" | base best {best_base[1]} {best_base[0]:.2f} ({best_base[0] / best[0]:.3f}x)"
                         if best_base else "")
                      + (f" bnb {res['bnb']:.2f}" if "bnb" in res else "") + f" | {line}", flush=True)  # fmt: skip
                if args.parts:
                    cfg = next(c for nm, c, _ in fns if nm == best[1])
                    kern, red = parts(x, pw, cfg, args.rep)
                    print(f"    parts of {best[1]}: kernel {kern:.2f} us, reduction {red:.2f} us", flush=True)
                    rows.append({"k": k, "n": n, "m": m, "dtype": dname, "name": f"parts {best[1]}", "config": cfg,
                                 "kernel_us": kern, "reduce_us": red})  # fmt: skip
            del w, wd, pw, packed
            print(f"[{time.time() - t_start:.0f} s]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Probe (GPU, sm90): linear_4bit's wgmma kernel at forced configs against the op's own choice, dense F.linear and
bnb.matmul_4bit at M = 17..256.

    python ci/linear4bit_wgmma_probe.py [--shapes KxN,...] [--ms 32,64,128,256] [--dtypes bf16]
                                        [--check-only] [--skip-check] [--json FILE] [--rep MS]
                                        [--baseline FILE [--baseline-unchecked]] [--async-only]

The configs are the tuner's (tritonbits_harness.tune.wgmma_candidates), run through the op's own launches
(linear_4bit.forward_2d with the config: x's copy in the kernel's K order, the kernel, the split-K reduction).
Every timed config is first checked against the K-aware policy (tritonbits_harness.tolerance.assert_matmul); the
checks cover nf4/fp4, nested or not, blocksizes 64-256, fp16/bf16, bias, x rows inside a wider buffer, M and N not
multiples of the tile, and split K. Times are CUDA-graph medians (tritonbits_harness.timing.bench_graph), in us.
--baseline FILE times another version of ops/linear_4bit_wgmma.py (a copy of the file, as committed before a change)
at the same configs in the same process, its rows named "base ...": the op's launches with that module's kernels;
with --baseline-unchecked its outputs are not checked (a timing-only ablation whose weights are wrong by design)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import time
from functools import partial

import torch
import triton

import tritonbits
from tritonbits.ops import linear_4bit as L
from tritonbits.quant_state import prepare
from tritonbits_harness import timing
from tritonbits_harness.bench.linear_4bit import DTYPES, parse_shapes
from tritonbits_harness.tolerance import assert_matmul
from tritonbits_harness.tune import wgmma_candidates

CHECK_CONFIGS = (
    (64, 1, 1, True),
    (32, 1, 3, False),
    (128, 2, 2, True),
    (64, 2, 1, False),
    (32, 2, 1, True),
    (256, 2, 1, True),
    (256, 1, 2, False),
)


def _weight(n, k, dtype, gen, bs=64, qt="nf4", nested=True):
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(dtype)
    packed, qs = tritonbits.quantize_4bit(w, blocksize=bs, quant_type=qt, compress_statistics=nested)
    return w, packed, qs


def _name(cfg: dict) -> str:
    return f"wg bm{cfg['bm']} wg{cfg['wg']} s{cfg['split_k']} a{int(cfg['async'])}"


def check_cases(gen) -> int:
    """Correctness of the wgmma path on varied problems (each against the K-aware policy); returns failures."""
    fails = 0
    cases = []
    for dname in ("bf16", "fp16"):
        for qt in ("nf4", "fp4"):
            for nested in (True, False):
                for bs in (64, 128, 256):
                    cases.append((dname, qt, nested, bs, 37, 1000, 512, False))
    cases += [("bf16", "nf4", True, 64, m, 4096, 1024, True) for m in (17, 64, 100, 128, 256)]
    cases += [("fp16", "nf4", True, 64, m, 1000, 768, True) for m in (17, 64, 129)]
    for dname, qt, nested, bs, m, n, k, with_bias in cases:
        dtype = DTYPES[dname]
        _, packed, qs = _weight(n, k, dtype, gen, bs, qt, nested)
        pw, wd = prepare(packed, qs), tritonbits.dequantize_4bit(packed, qs)
        x = torch.randn(m, k + 64 * with_bias, device="cuda", dtype=dtype, generator=gen)[:, :k]  # wider rows too
        bias = torch.randn(n, device="cuda", dtype=dtype, generator=gen) if with_bias else None
        name = f"{dname} {qt} nested={nested} bs{bs} M={m} N={n} K={k} bias={with_bias}"
        if not L.wgmma_ok(pw, x, x.device):
            print(f"check {name}: wgmma_ok refused", flush=True)
            fails += 1
            continue
        bad = []
        for bm, wg, split, asy in CHECK_CONFIGS:
            cfg = {"path": "wgmma", "bm": bm, "wg": wg, "split_k": split, "async": asy}
            try:
                out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
                L.launch_fused(x, pw, bias, out, cfg)
                assert_matmul(out, x, wd, bias)
            except Exception as exc:  # a probe: log and go on
                bad.append(f"{_name(cfg)}: {type(exc).__name__}: {str(exc)[:300]}")
        fails += len(bad)
        print(f"check {name}: " + ("ok" if not bad else "FAIL " + " | ".join(bad)), flush=True)
    return fails


def load_baseline(path: str):
    """Another version of linear_4bit_wgmma (a copy of the module's file), its kernels given launchers."""
    spec = importlib.util.spec_from_file_location("wgmma_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    L._LAUNCHERS[mod._x_perm_kernel] = L.CachedLauncher(mod._x_perm_kernel)
    L._LAUNCHERS[mod.linear_4bit_wgmma_kernel] = L.CachedLauncher(mod.linear_4bit_wgmma_kernel)
    return mod


@contextlib.contextmanager
def _module(mod):
    """The op's wgmma launches built from mod's kernels inside the block."""
    old, L.wg4 = L.wg4, mod
    try:
        yield
    finally:
        L.wg4 = old


def _with(mod, fn):
    with _module(mod):
        return fn()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="KxN,KxN,... (default: the benchmark's shapes)")
    ap.add_argument("--ms", default="32,64,128,256")
    ap.add_argument("--dtypes", default="bf16")
    ap.add_argument("--rep", type=int, default=20)
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--baseline", default=None, help="a copy of linear_4bit_wgmma.py to time beside this one")
    ap.add_argument(
        "--baseline-unchecked",
        action="store_true",
        help="time the baseline without checking its outputs (an ablation that is wrong by design)",
    )
    ap.add_argument("--async-only", action="store_true", help="only the configs with asynchronous products")
    args = ap.parse_args()
    if args.baseline_unchecked and not args.baseline:
        ap.error("--baseline-unchecked needs --baseline")
    base = load_baseline(args.baseline) if args.baseline else None
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()} triton {triton.__version__}", flush=True)
    if args.baseline_unchecked:  # said in the log and in every "base" row of --json
        print("--baseline-unchecked: the baseline's outputs are NOT checked; its rows are timings only", flush=True)
    if not args.skip_check:
        fails = check_cases(gen)
        print(f"checks: {fails} failures", flush=True)
        if args.check_only or fails:
            raise SystemExit(1 if fails else 0)
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    rows = []
    t0 = time.time()
    for k, n in parse_shapes(args.shapes):
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            w, packed, qs = _weight(n, k, dtype, gen)
            pw, wd = prepare(packed, qs), tritonbits.dequantize_4bit(packed, qs)
            bq, bstate = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            for m in (int(v) for v in args.ms.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
                fns = [("op", partial(tritonbits.linear_4bit, x, packed, qs)),
                       ("dense", partial(torch.nn.functional.linear, x, w)),
                       ("bnb", partial(bnb.matmul_4bit, x, bq.t(), quant_state=bstate))]  # fmt: skip
                for cfg in wgmma_candidates(m, n, k):
                    if args.async_only and not cfg["async"]:
                        continue
                    for prefix, mod in (("", None), ("base ", base)):
                        if prefix and mod is None:
                            continue  # (a config the baseline cannot run fails below, logged)
                        run = partial(L.forward_2d, x, pw, None, config=cfg)
                        if mod is not None:
                            run = partial(_with, mod, run)
                        try:
                            if mod is not None and args.baseline_unchecked:
                                run()  # a timing-only variant: its weights are wrong by design
                            else:
                                assert_matmul(run(), x, wd)
                        except Exception as exc:  # a probe: log and go on
                            print(f"K={k} N={n} M={m} {prefix}{_name(cfg)}: {type(exc).__name__}: {str(exc)[:300]}",
                                  flush=True)  # fmt: skip
                            continue
                        fns.append((prefix + _name(cfg), run))
                res = {nm: timing.bench_graph(fn, rep=args.rep) * 1e3 for nm, fn in fns}
                best = min((v, nm) for nm, v in res.items() if nm.startswith("wg"))
                bbest = min(((v, nm) for nm, v in res.items() if nm.startswith("base")), default=None)
                if base is not None and bbest is None:
                    print(f"K={k:5d} N={n:5d} M={m:3d} {dname}: the baseline ran no config", flush=True)
                elif bbest is not None:
                    print(f"K={k:5d} N={n:5d} M={m:3d} {dname}: baseline best {bbest[1]} {bbest[0]:.2f} us, this "
                          f"version's best / baseline's {best[0] / bbest[0]:.3f}", flush=True)  # fmt: skip
                for nm, v in res.items():
                    # checked: this row's output was checked against the policy here (not the op's, dense's, bnb's)
                    checked = nm.startswith("wg") or (nm.startswith("base") and not args.baseline_unchecked)
                    rows.append({"k": k, "n": n, "m": m, "dtype": dname, "name": nm, "us": v, "checked": checked})
                print(
                    f"K={k:5d} N={n:5d} M={m:3d} {dname}: best {best[1]} {best[0]:.2f} us | op {res['op']:.2f} "
                    f"dense {res['dense']:.2f} bnb {res['bnb']:.2f} | x op {res['op'] / best[0]:.2f} x dense "
                    f"{res['dense'] / best[0]:.2f} x bnb {res['bnb'] / best[0]:.2f} | "
                    + " ".join(f"{nm.replace('wg ', '')}={v:.1f}" for nm, v in res.items() if "wg" in nm),
                    flush=True,
                )
            del w, wd, pw, packed
            print(f"[{time.time() - t0:.0f} s]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

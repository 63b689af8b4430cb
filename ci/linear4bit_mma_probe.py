"""linear_4bit's "mma" kernel (per-block tables, byte-permute decode, mma.sync) against the op's current path and
bnb.matmul_4bit on one GPU: every candidate's output is checked against the K-aware policy first, then timed
(CUDA-graph medians, tritonbits_harness.timing.bench_graph); one line per (shape, M, dtype, candidate).

    python ci/linear4bit_mma_probe.py [--shapes KxN,...] [--ms 1,4,16] [--dtypes bf16] [--warps 2,4,8]
        [--splits 1,2,4,8,16] [--kwarps 1] [--kwarps-splits 1,2] [--prefetch 1] [--baseline FILE
        [--baseline-unchecked]] [--parts] [--eager] [--rep 20] [--no-bnb] [--check-only] [--json PATH]

--check-only runs the correctness cases only (fp16/bf16, nf4/fp4, nested or not, blocksizes 64/128/256, odd M and
N, bias, a strided x), no timing. --baseline FILE also times another linear_4bit_mma.py with the same kernel
arguments (`git show REV:packages/kernels/src/tritonbits/ops/linear_4bit_mma.py > FILE`, the working tree then
holding a variant) at the same configs, so a kernel change is compared with its base in one run
(--baseline-unchecked: its outputs not checked, for a timing-only ablation that is wrong by design). --parts times,
for the best mma config of each case, its lane-order copy (M > 8), its mma kernel and its split-K reduction alone
(buffers made outside the graph). --kwarps K,... adds configs whose warps split a program's K range (each K > 1
dividing the warps, at the --kwarps-splits only: one split is one launch, no workspace). --eager also times, per
case, the op's eager call (`tritonbits.linear_4bit`, its plan and bound launches) with the best one-launch and the
best two-launch config forced through `config_for`: seconds per call of 200 back-to-back calls and one synchronize
(`timing.host_us`, the least disturbed of 9 interleaved rounds), the figure a host-bound decode loop sees.
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


# (warps, splits, K warps) of the correctness cases: K warps dividing a split's segments or not (MASKED), with and
# without a prefetch (split 3 runs without), one split or several
CHECK_CONFIGS = ((4, 1, 1), (2, 2, 1), (8, 3, 1), (4, 1, 4), (8, 1, 8), (8, 3, 4), (4, 2, 2), (2, 1, 2))


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
    cases += [("fp16", "nf4", True, 64, m, 1000, 768, True, True) for m in (1, 7, 13, 29, 64)]
    cases += [("bf16", "fp4", False, 128, m, 2000, 1024, True, False) for m in (17, 32, 47)]
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
        for warps, split, kwarps in CHECK_CONFIGS:
            cfg = {"path": "mma", "warps": warps, "split_k": split, "kwarps": kwarps, "prefetch": split != 3}
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
        j = next(i for i, la in enumerate(launches) if la.fn is L.mma4.linear_4bit_mma_kernel)
        la = launches[j]
        if "x_sn" not in mod.linear_4bit_mma_kernel.arg_names:  # session 20's kernel: x in place, one row stride
            if x2.shape[0] > L.mma4.DIRECT_MAX_M:
                raise ValueError("the baseline kernel reads x in place only (M <= DIRECT_MAX_M)")
            la = la._replace(args=la.args[:13] + la.args[16:])  # x_sn is its stride_xm; no x_st4, x_ss4, x_si4
        launches[j] = la._replace(fn=mod.linear_4bit_mma_kernel)
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
    """(lane-order copy, mma kernel, split-K reduction) alone in us for one config (nan where the config has none),
    buffers allocated outside the graph."""
    out = torch.empty(x.shape[0], pw.state.shape[0], device="cuda", dtype=x.dtype)
    launches, _ws = L.fused_launches(x, pw, None, out, cfg, True)
    times = {la.fn: timing.bench_graph(partial(L._launch, la, x.device, None, True), rep=rep) * 1e3
             for la in launches}  # fmt: skip
    fns = (L.mma4._lane_order_kernel, L.mma4.linear_4bit_mma_kernel, L._splitk_reduce_kernel)
    return [times.get(fn, float("nan")) for fn in fns]


def sweep_configs(args, k: int) -> list[tuple[int, int, int]]:
    """(warps, splits, K warps) to time: every --warps x --splits with one K warp, and the --kwarps > 1 dividing the
    warps at the --kwarps-splits."""
    out = []
    for warps in (int(v) for v in args.warps.split(",")):
        for split in (int(v) for v in args.splits.split(",")):
            if split > k // 256:
                continue
            out.append((warps, split, 1))
            if split in {int(v) for v in args.kwarps_splits.split(",")}:
                kws = (int(v) for v in args.kwarps.split(","))
                out += [(warps, split, kw) for kw in kws if kw > 1 and warps % kw == 0]
    return out


def launches_of(cfg: dict, m: int, n: int, k: int) -> int:
    """The op's launches for an mma config (`launch_count`: the kernel, the split-K reduction where it splits K, the
    lane-order copy above M = 8)."""
    return L.launch_count(cfg, m, n, k)


def eager(x, packed, qs, fns, res, rows, k, n, m, dname) -> None:
    """The op's eager call with the best one-launch and the best two-launch mma config forced (see the module doc)."""
    import copy

    best: dict[int, tuple[float, dict]] = {}
    for name, cfg, _fn in fns:
        if cfg is not None and name.startswith("mma"):
            nl = launches_of(cfg, m, n, k)
            if nl not in best or res[name] < best[nl][0]:
                best[nl] = (res[name], cfg)
    calls = {}
    config_for = L.config_for
    for nl, (_t, cfg) in sorted(best.items()):
        q2 = copy.copy(qs)  # a fresh quant state: its own prepared weight, so its own plans with this config
        calls[f"eager {nl} launch(es) {cfg}"] = (q2, cfg)
    timed = {}
    try:
        for q2, cfg in calls.values():
            L.config_for = lambda device, x_dtype, m_, n_, k_, _cfg=cfg: dict(_cfg)
            tritonbits.linear_4bit(x, packed, q2)  # plans with this config
        L.config_for = config_for
        funcs = {label: partial(tritonbits.linear_4bit, x, packed, q2) for label, (q2, _cfg) in calls.items()}
        timed = timing.host_us_rounds(funcs, rounds=9, n=200)
    finally:
        L.config_for = config_for
    line = " | ".join(f"{label}: {mn:.2f} us (median {md:.2f})" for label, (mn, md) in timed.items())
    print(f"    eager K={k} N={n} M={m} {dname}: {line}", flush=True)
    for label, (mn, md) in timed.items():
        rows.append({"k": k, "n": n, "m": m, "dtype": dname, "name": label, "eager_us_min": mn, "eager_us_median": md,
                     "checked": False})  # fmt: skip


def checked_row(name: str, args) -> bool:
    """A --json row's `checked`: whether its variant's output was checked against the policy in this run (the mma
    configs and the baseline's, unless --baseline-unchecked; not the op's or bnb's, which this probe only times)."""
    return name.startswith("mma") or (name.startswith("base") and not args.baseline_unchecked)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="KxN,KxN,... (default: the benchmark's shapes)")
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--dtypes", default="bf16")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--splits", default="1,2,4,8,16")
    ap.add_argument("--kwarps", default="1")
    ap.add_argument("--kwarps-splits", default="1,2")
    ap.add_argument("--prefetch", default="1")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--baseline", default=None, help="another linear_4bit_mma.py, timed at the same configs")
    ap.add_argument(
        "--baseline-unchecked",
        action="store_true",
        help="time the baseline without checking its outputs (an ablation that is wrong by design)",
    )
    ap.add_argument("--parts", action="store_true")
    ap.add_argument("--rep", type=int, default=20)
    ap.add_argument("--no-bnb", action="store_true")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.baseline_unchecked and not args.baseline:
        ap.error("--baseline-unchecked needs --baseline")
    base = load_baseline(args.baseline) if args.baseline else None
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()} triton mma AVAILABLE={L.mma4.AVAILABLE}", flush=True)
    if args.baseline_unchecked:  # said in the log and in every "base" row of --json
        print("--baseline-unchecked: the baseline's outputs are NOT checked; its rows are timings only", flush=True)
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
                for warps, split, kwarps in sweep_configs(args, k):
                    for pf in (int(v) for v in args.prefetch.split(",")):
                        cfg = {"path": "mma", "warps": warps, "split_k": split, "kwarps": kwarps,
                               "prefetch": bool(pf)}  # fmt: skip
                        try:
                            y = L.forward_2d(x, pw, None, config=cfg)
                            assert_matmul(y, x, wd)
                        except Exception as exc:  # a probe: log and go on
                            print(f"K={k} N={n} M={m} {dname} {cfg}: {type(exc).__name__}: {str(exc)[:300]}",
                                  flush=True)  # fmt: skip
                            continue
                        fns.append((f"mma w{warps} s{split} kw{kwarps} pf{pf}", cfg,
                                    partial(L.forward_2d, x, pw, None, config=cfg)))  # fmt: skip
                        if base is not None:
                            fn = with_kernel_of(base, partial(L.forward_2d, x, pw, None, config=cfg))
                            if args.baseline_unchecked:
                                fn()  # a timing-only variant: its weights are wrong by design
                            else:
                                assert_matmul(fn(), x, wd)
                            fns.append((f"base w{warps} s{split} kw{kwarps} pf{pf}", cfg, fn))
                if not args.no_bnb:
                    fns.append(("bnb", None, partial(bnb.matmul_4bit, x, bq.t(), quant_state=bstate)))
                res = {}
                for name, cfg, fn in fns:
                    t = timing.bench_graph(fn, rep=args.rep) * 1e3
                    res[name] = t
                    rows.append({"k": k, "n": n, "m": m, "dtype": dname, "name": name, "config": cfg, "us": t,
                                 "checked": checked_row(name, args)})  # fmt: skip
                best = min((v, nm) for nm, v in res.items() if nm.startswith("mma"))
                best_base = min(((v, nm) for nm, v in res.items() if nm.startswith("base")), default=None)
                line = " ".join(f"{nm}={v:.2f}" for nm, v in res.items())
                print(f"K={k:5d} N={n:5d} M={m:2d} {dname}: best {best[1]} {best[0]:.2f} us | op {res['op']:.2f}"
                      + (f" | base best {best_base[1]} {best_base[0]:.2f} ({best_base[0] / best[0]:.3f}x)"
                         if best_base else "")
                      + (f" bnb {res['bnb']:.2f}" if "bnb" in res else "") + f" | {line}", flush=True)  # fmt: skip
                if args.eager:
                    eager(x, packed, qs, fns, res, rows, k, n, m, dname)
                if args.parts:
                    cfg = next(c for nm, c, _ in fns if nm == best[1])
                    copy, kern, red = parts(x, pw, cfg, args.rep)
                    print(f"    parts of {best[1]}: lane-order copy {copy:.2f} us, kernel {kern:.2f} us, reduction "
                          f"{red:.2f} us", flush=True)  # fmt: skip
                    rows.append({"k": k, "n": n, "m": m, "dtype": dname, "name": f"parts {best[1]}", "config": cfg,
                                 "copy_us": copy, "kernel_us": kern, "reduce_us": red, "checked": True})  # fmt: skip
            del w, wd, pw, packed
            print(f"[{time.time() - t_start:.0f} s]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

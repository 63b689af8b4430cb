"""Issue 11 probe (GPU machine; the three src/ trees on PYTHONPATH): exactness against bnb CUDA and speed of
tritonbits.quantize_blockwise (8-bit dynamic code) and of the nested bf16 tritonbits.quantize_4bit.

    python ci/quantize_probe.py --out DIR [--budget-s 150] [--only b8|q4] [--dry]

Per case: torch.equal of every output with bnb CUDA, then medians of triton.testing.do_bench (L2 flushed
between calls) for tritonbits, bnb and a device copy of the same bytes (read + written), and
do_bench_cudagraph for tritonbits and the copy (bnb's quantizers cannot be graph-captured: bnb launches them
through ctypes on a stream the capture does not see / copies its code table from the host). Prints GB/s (the
docs' bytes model), % of copy and x bnb; the variants (encoders, pair reads, the nested path's steps) are
timed too (4-bit: the round and lean encoders, pairs and split; 8-bit: every encoder). Every case is wrapped: a
failure is logged and the probe goes on; it stops before a case when the budget is spent. Writes
DIR/quantize_probe.log and DIR/quantize_probe.jsonl.

--dry: tiny shapes, no timing, no bnb (the numpy oracles instead): a CPU smoke run under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

import tritonbits
from tritonbits import formats
from tritonbits.ops import blockwise_8bit as b8
from tritonbits.ops import quantize_4bit as q4

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
B8_CASES = [(dt, 1 << p, 4096) for p in (24, 25, 26) for dt in ("fp32", "bf16", "fp16")]
B8_CASES += [(dt, 1 << 26, bs) for bs in (256, 1024) for dt in ("bf16", "fp32")]
Q4_SHAPES = [(4096, 4096), (14336, 4096), (28672, 8192)]
Q4_CASES = [(shape, qt) for shape in Q4_SHAPES for qt in ("nf4", "fp4")]


class Probe:
    def __init__(self, out: Path, budget_s: float, dry: bool):
        self.out, self.budget_s, self.dry = out, budget_s, dry
        self.start = time.perf_counter()
        self.device = torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = (out / "quantize_probe.log").open("a")
        self.jsonl = (out / "quantize_probe.jsonl").open("a")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, msg: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def record(self, row: dict) -> None:
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s

    def case(self, name: str, fn) -> None:
        if self.over_budget():
            self.log(f"SKIP {name}: budget of {self.budget_s:.0f} s spent")
            return
        self.log(f"--- {name}")
        try:
            fn()
        except Exception as exc:  # one failing case must not end the probe
            self.log(f"FAIL {name}: {type(exc).__name__}: {exc}")
            self.log_file.write(traceback.format_exc())
            self.record({"case": name, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            if not self.dry:
                torch.cuda.empty_cache()

    # -- timing -------------------------------------------------------------------------------------------
    def time_ms(self, fn, graph: bool = False) -> float | None:
        if self.dry:  # one call, wall time: exercises every code path of the GPU run
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        import triton.testing

        try:
            if graph:
                return float(triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median"))
            return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
        except Exception as exc:
            self.log(f"  timing failed ({'graph' if graph else 'launch'}): {type(exc).__name__}: {exc}")
            return None

    def copy_ms(self, nbytes: int, graph: bool) -> float | None:
        """A device copy moving nbytes in all (nbytes / 2 read, nbytes / 2 written)."""
        half = max(nbytes // 2, 1)
        src = torch.empty(half, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        return self.time_ms(lambda: dst.copy_(src), graph)

    def report(self, name: str, nbytes: int, timings: dict[str, dict[str, float | None]], extra: dict) -> None:
        """timings: {provider: {"launch": ms, "graph": ms}}; the copy and bnb rows are the references."""
        copy = timings.get("copy", {})
        bnb = timings.get("bnb", {})
        row = {"case": name, "bytes": nbytes, **extra, "ms": timings}
        for prov, modes in timings.items():
            for mode, ms in modes.items():
                if ms is None:
                    continue
                gbps = nbytes / ms * 1e-6
                parts = [f"  {prov:<24} {mode:<6} {ms * 1e3:9.1f} us {gbps:7.0f} GB/s"]
                if copy.get(mode):
                    parts.append(f"{100 * copy[mode] / ms:5.1f}% of copy")
                if bnb.get("launch") and prov != "bnb":
                    parts.append(f"{bnb['launch'] / ms:5.2f}x bnb(launch)")
                self.log("  ".join(parts))
        self.record(row)


class _OracleFunctional:
    """bnb.functional's two quantizers from the numpy oracles of bnb CUDA, for --dry on the CPU."""

    @staticmethod
    def quantize_blockwise(x, blocksize=4096):
        import types

        import tritonbits_reference as R

        q, state = R.quantize_blockwise_cuda(x, blocksize=blocksize)
        return q, types.SimpleNamespace(absmax=state["absmax"])

    @staticmethod
    def quantize_4bit(x, blocksize=64, quant_type="fp4", compress_statistics=False):
        import tritonbits_reference as R

        return R.quantize_4bit_cuda(x, blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=compress_statistics)  # fmt: skip


def bnb_functional(p: Probe):
    if p.dry:
        return _OracleFunctional
    import bitsandbytes.functional as F

    return F


def equal(name: str, got: torch.Tensor, want: torch.Tensor) -> bool:
    """torch.equal, logged: a mismatch is reported (first indices) and the case goes on to its timings."""
    try:
        return _equal(name, got, want)
    except AssertionError as exc:
        print(f"  MISMATCH {exc}", flush=True)
        if _PROBE is not None:
            _PROBE.log(f"  MISMATCH {exc}")
            _PROBE.record({"mismatch": str(exc)})
        return False


_PROBE: Probe | None = None


def _equal(name: str, got: torch.Tensor, want: torch.Tensor) -> bool:
    got, want = got.reshape(-1), want.reshape(-1).to(got.device)
    if got.dtype != want.dtype or got.shape != want.shape:
        raise AssertionError(f"{name}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}")
    ok = torch.equal(got, want)
    if not ok:
        bad = (got != want).nonzero().flatten()
        raise AssertionError(f"{name}: {bad.numel()} of {got.numel()} differ, first at {bad[:5].tolist()}: "
                             f"{got[bad[:5]].tolist()} vs {want[bad[:5]].tolist()}")  # fmt: skip
    return ok


# ---------------------------------------------------------------------------------------------------------
# quantize_blockwise


def blockwise_case(p: Probe, dt: str, n: int, bs: int) -> None:
    dtype = DTYPES[dt]
    g = torch.Generator(device=p.device).manual_seed(n + bs)
    x = (torch.randn(n, generator=g, device=p.device) * 3).to(dtype)
    q, state = tritonbits.quantize_blockwise(x, blocksize=bs)
    F = bnb_functional(p)
    want_q, want = F.quantize_blockwise(x, blocksize=bs)
    ok = equal("q", q, want_q) & equal("absmax", state.absmax, want.absmax)
    p.log(f"  {'exact' if ok else 'NOT EXACT'} vs {'the oracle' if p.dry else 'bnb CUDA'} (q, absmax)")
    nbytes = n * x.element_size() + n + 4 * (-(-n // bs))
    out = torch.empty(n, dtype=torch.uint8, device=p.device)
    absmax = torch.empty(-(-n // bs), dtype=torch.float32, device=p.device)
    code = formats.code_table("dynamic", p.device)
    timings: dict[str, dict[str, float | None]] = {}
    public = lambda: tritonbits.quantize_blockwise(x, blocksize=bs)
    timings["tritonbits"] = {"launch": p.time_ms(public), "graph": p.time_ms(public, graph=True)}
    for enc in b8.ENCODERS:
        fn = lambda enc=enc: b8.launch_quantize(x, code, out, absmax, bs, encoder=enc)
        fn()
        equal(f"q[{enc}]", out, want_q)
        timings[f"kernel-{enc}"] = {"launch": p.time_ms(fn), "graph": p.time_ms(fn, graph=True)}
    timings["bnb"] = {"launch": p.time_ms(lambda: F.quantize_blockwise(x, blocksize=bs))}
    timings["copy"] = {"launch": p.copy_ms(nbytes, False), "graph": p.copy_ms(nbytes, True)}
    p.report(f"quantize_blockwise {dt} n=2^{n.bit_length() - 1} bs={bs}", nbytes, timings,
             {"op": "quantize_blockwise", "dtype": dt, "n": n, "blocksize": bs})  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# quantize_4bit, nested (compress_statistics=True), bf16


def q4_case(p: Probe, shape: tuple[int, int], qt: str, dtype: torch.dtype = torch.bfloat16) -> None:
    g = torch.Generator(device=p.device).manual_seed(shape[0] * 7 + shape[1])
    x = (torch.randn(shape, generator=g, device=p.device) * 0.02).to(dtype)
    n = x.numel()
    packed, state = tritonbits.quantize_4bit(x, blocksize=64, quant_type=qt, compress_statistics=True)
    F = bnb_functional(p)
    want_packed, want = F.quantize_4bit(x, blocksize=64, quant_type=qt, compress_statistics=True)
    ok = equal("packed", packed, want_packed) & equal("absmax(u8)", state.absmax, want.absmax)
    ok &= equal("offset", state.offset.reshape(()), want.offset.reshape(()))
    ok &= equal("state2.absmax", state.state2.absmax, want.state2.absmax)
    against = "the oracle" if p.dry else "bnb CUDA"
    p.log(f"  {'exact' if ok else 'NOT EXACT'} vs {against} (packed, absmax u8, offset, state2.absmax)")
    blocks = -(-n // 64)
    # bytes model (docs/kernels/quantize_4bit.md): input + n/2 packed + fp32 absmax written and read twice
    # (mean, 8-bit step) + 1 byte a block + 4 bytes per 256 blocks
    nbytes = n * x.element_size() + n // 2 + 12 * blocks + blocks + 4 * (-(-blocks // 256))
    plain_bytes = n * x.element_size() + n // 2 + 4 * blocks
    flat = x.view(-1)
    pk = torch.empty(n // 2, dtype=torch.uint8, device=p.device)
    am32 = torch.empty(blocks, dtype=torch.float32, device=p.device)
    am8 = torch.empty(blocks, dtype=torch.uint8, device=p.device)
    timings: dict[str, dict[str, float | None]] = {}
    public = lambda: tritonbits.quantize_4bit(x, blocksize=64, quant_type=qt, compress_statistics=True)
    timings["tritonbits"] = {"launch": p.time_ms(public), "graph": p.time_ms(public, graph=True)}
    timings["bnb"] = {"launch": p.time_ms(lambda: F.quantize_4bit(x, blocksize=64, quant_type=qt,
                                                                   compress_statistics=True))}  # fmt: skip
    timings["copy"] = {"launch": p.copy_ms(nbytes, False), "graph": p.copy_ms(nbytes, True)}
    p.report(f"quantize_4bit nested {qt} {shape[0]}x{shape[1]} bf16", nbytes, timings,
             {"op": "quantize_4bit", "nested": True, "quant_type": qt, "shape": list(shape)})  # fmt: skip
    # the nested path's steps and the 4-bit pass's variants (plain bytes model for the 4-bit kernel alone)
    steps: dict[str, dict[str, float | None]] = {}
    for enc in ("round", "lean"):  # the default and its leaner variant (same codes; docs/kernels/quantize_4bit.md)
        for pairs in (True, False):
            fn = lambda enc=enc, pairs=pairs: q4.launch(flat, pk, am32, 64, qt, encoder=enc, pairs=pairs)
            fn()
            equal(f"packed[{enc},{pairs}]", pk, want_packed)
            steps[f"4bit-{enc}-{'pairs' if pairs else 'split'}"] = {"graph": p.time_ms(fn, graph=True)}
    steps["copy"] = {"graph": p.copy_ms(plain_bytes, True)}
    p.report(f"  4-bit pass alone {qt} {shape[0]}x{shape[1]}", plain_bytes, steps, {"op": "quantize_4bit-pass"})
    mean = lambda: am32.mean()
    nested = lambda: q4._nested(am32, am8)
    tail = {"mean": {"graph": p.time_ms(mean, graph=True)}, "mean+8bit": {"graph": p.time_ms(nested, graph=True)}}
    p.report(f"  nested tail {qt} {shape[0]}x{shape[1]} ({blocks} blocks)", 4 * blocks * 3 + blocks, tail,
             {"op": "quantize_4bit-nested-tail"})  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "quantize_probe_out")))
    parser.add_argument("--budget-s", type=float, default=150.0)
    parser.add_argument("--dry", action="store_true", help="tiny shapes, no timing, oracles (CPU interpreter)")
    parser.add_argument("--only", choices=("b8", "q4"), help="only the 8-bit or only the 4-bit cases")
    args = parser.parse_args()
    p = Probe(args.out, args.budget_s, args.dry)
    global _PROBE
    _PROBE = p
    import triton

    env = f"torch {torch.__version__}, triton {triton.__version__}"
    if not args.dry:
        import bitsandbytes

        env += f", bitsandbytes {bitsandbytes.__version__}, {torch.cuda.get_device_name()}"
    p.log(f"quantize probe: {env}; budget {args.budget_s:.0f} s; dry={args.dry}")
    if args.dry:
        b8_cases = [("fp32", 5000, 256), ("bf16", 4096 + 64, 4096), ("fp16", 3000, 1024)]
        q4_cases = [((64, 96), "nf4"), ((33, 64), "fp4")]
    else:
        # the headline shapes first, so a short budget still measures them
        b8_cases = sorted(B8_CASES, key=lambda c: (c[1] != 1 << 26 or c[2] != 4096, c))
        q4_cases = Q4_CASES
    order = [("b8", c) for c in b8_cases[:3]] + [("q4", c) for c in q4_cases] + [("b8", c) for c in b8_cases[3:]]
    order = [(kind, c) for kind, c in order if args.only in (None, kind)]
    for kind, c in order:
        if kind == "b8":
            dt, n, bs = c  # type: ignore[misc]
            p.case(f"quantize_blockwise {dt} n={n} bs={bs}", lambda dt=dt, n=n, bs=bs: blockwise_case(p, dt, n, bs))
        else:
            shape, qt = c  # type: ignore[misc]
            p.case(f"quantize_4bit nested {qt} {shape}", lambda shape=shape, qt=qt: q4_case(p, shape, qt))
    p.log(f"done in {p.elapsed():.0f} s; log {args.out / 'quantize_probe.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SASS instruction counts of tritonbits kernels, compiled OFFLINE for a CUDA target (default sm90, H100) on a
machine without a GPU. Instruction counts only: they say nothing measured about speed.

    python ci/sass_count.py [--json] [--only SUBSTR] [--arch 90] [--shape 4096x4096] [--rcp MODE]
                            [--num-warps N] [--dump DIR]

Each config is planned by the op's own plan function (quantize_4bit.plan, blockwise_8bit.plan_quantize,
dequantize_4bit.plan) or recorded from its launch function (blockwise_8bit.launch_dequantize, through the
`kernel=` hook), on CPU tensors of the launch's shape, with the device-dependent choices made as on a CUDA
sm80+ device (the reciprocal mode RCP_GPU, the flushing multiply in PTX, native bf16 conversion). Triton's own
argument binder then turns the launch into the signature, constexprs and specialization attributes (16-byte
pointer alignment, integer divisibility) that `kernel[grid](...)` would compile, and `triton.compile` builds the
cubin for the target; nvdisasm (bundled with Triton) disassembles it.

Counted: every SASS instruction but NOPs and the trailing `BRA` to itself after the last EXIT (padding).
`loop` is the instructions inside backward branches (none for these straight-line kernels: "-"); `per value`
is the count divided by the values one thread processes (values a program / (warps * 32)). `--dump DIR` writes
each config's .sass and .ptx.

The figures quoted in docs/kernels/quantize_4bit.md at 0a70d90 (NF4 round+pairs 304 / 19, FP4 344 / 21.5) were
compiled with `--rcp plain --num-warps 8` (the CPU's reciprocal mode, 16 values a thread); the launch the op
makes on a GPU uses rcp.approx and 4 warps for a 4096-value tile. Needs no TRITON_INTERPRET (it is switched
off here) and no CUDA device; uses Triton's binder internals (triton.runtime.jit), checked with triton 3.9 and
with the GPU machine's 3.6 (on PYTHONPATH ahead of the venv's: docs/gpu-sessions.md). Also counted: linear_4bit's
launches at M = 1, 2, 4 on an nf4 nested bs64 bf16 weight of --shape's N x K (the H100 table's configs, planned
for 132 SMs), with --mma its Gluon mma kernel at M = 1, 4, 8, 16, 32, 64 and with --wgmma its Gluon wgmma kernel at
M = 32, 64, 128, 256 (Gluon needs the GPU machine's 3.6 here).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ["TRITON_INTERPRET"] = "0"  # before triton and tritonbits are imported: compile, don't interpret

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from tritonbits import _runtime, configs, formats

# TRITON_DEFAULT_FP_FUSION unset: a launch gets the same default (fusion on in triton 3.9); the warning is noise
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
from tritonbits.ops import blockwise_8bit as b8  # noqa: E402
from tritonbits.ops import dequantize_4bit as d4  # noqa: E402
from tritonbits.ops import quantize_4bit as q4  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
LABEL = re.compile(r"^(\.L_x_\d+):")


@dataclass
class Launch:
    """One launch as the op makes it: the jitted kernel, grid, positional args, constexprs, options."""

    name: str
    fn: Any
    grid: tuple
    args: tuple
    constexprs: dict
    options: dict
    values: int  # values one program processes (input elements for quantize, output elements for dequantize)
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def as_cuda(rcp: str | None):
    """Make the ops' device-dependent choices as on a CUDA sm80+ device while they plan on CPU tensors."""
    saved = (_runtime.native_bf16_conversion, b8.rcp_mode, _runtime.ftz_mode)
    gpu_rcp = rcp or b8.RCP_GPU
    _runtime.native_bf16_conversion = lambda device: True  # type: ignore[assignment]
    b8.rcp_mode = lambda device, rcp=None: rcp or gpu_rcp  # type: ignore[assignment]
    _runtime.ftz_mode = lambda device: "ptx"  # type: ignore[assignment]
    try:
        yield
    finally:
        _runtime.native_bf16_conversion, b8.rcp_mode, _runtime.ftz_mode = saved  # type: ignore[assignment]


class Recorder:
    """Stands in for a wrap_triton'd kernel (`kernel=`): records kernel[grid](*args, **kwargs)."""

    def __init__(self, fn):
        self.fn, self.launches = fn, []

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.launches.append((grid, args, kwargs))

        return call


def _split(kwargs: dict) -> tuple[dict, dict]:
    options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages", "enable_fp_fusion", "maxnreg")}
    return {k: v for k, v in kwargs.items() if k not in options}, options


def _apply_warps(options: dict, num_warps: int | None) -> dict:
    return {**options, "num_warps": num_warps} if num_warps is not None else options


# ---------------------------------------------------------------------------------------------------------
# The configs


def quantize_4bit_launches(n: int, rcp, num_warps, encoders) -> list[Launch]:
    out = []
    for qt in ("nf4", "fp4"):
        for dt, dtype in DTYPES.items():
            for enc in encoders:
                for pairs in (True, False):
                    x = torch.empty(n, dtype=dtype)
                    packed = torch.empty(q4.packed_bytes(n, torch.uint8), dtype=torch.uint8)
                    absmax = torch.empty(-(-n // 64), dtype=torch.float32)
                    with as_cuda(rcp):
                        grid, args, cx, opts = q4.plan(x, packed, absmax, 64, qt, encoder=enc, pairs=pairs)
                    opts = _apply_warps(opts, num_warps)
                    out.append(Launch(f"quantize_4bit {qt} {dt} bs64 {enc} {'pairs' if pairs else 'split'}",
                                      q4._quantize_4bit_kernel, grid, args, cx, opts,
                                      cx["ROWS"] * cx["BLOCKSIZE"]))  # fmt: skip
    return out


def quantize_blockwise_launches(n: int, rcp, num_warps, encoders) -> list[Launch]:
    out = []
    code = formats.code_table("dynamic", torch.device("cpu"))
    for dt in ("bf16", "fp16", "fp32"):
        for bs in (4096, 256):
            for enc in encoders:
                x = torch.empty(n, dtype=DTYPES[dt])
                q = torch.empty(n, dtype=torch.uint8)
                absmax = torch.empty(-(-n // bs), dtype=torch.float32)
                with as_cuda(rcp):
                    grid, args, cx, opts = b8.plan_quantize(x, code, q, absmax, bs, encoder=enc)
                opts = _apply_warps(opts, num_warps)
                out.append(Launch(f"quantize_blockwise {dt} bs{bs} {enc}", b8._quantize_blockwise_kernel, grid, args,
                                  cx, opts, cx["ROWS"] * cx["BLOCKSIZE"]))  # fmt: skip
    return out


def dequantize_4bit_launches(n: int, num_warps) -> list[Launch]:
    out = []
    for qt in ("nf4", "fp4"):
        for dt in ("bf16", "fp16", "fp32"):
            for nested in (True, False):
                if qt == "fp4" and (nested is False or dt != "bf16"):
                    continue  # the nibble decode is a table load for both types: one fp4 row is enough
                A = torch.empty((n + 1) // 2, dtype=torch.uint8)
                blocks = -(-n // 64)
                absmax = torch.empty(blocks, dtype=torch.uint8 if nested else torch.float32)
                code2 = formats.code_table("dynamic", torch.device("cpu")) if nested else None
                absmax2 = torch.empty(-(-blocks // 256), dtype=torch.float32) if nested else None
                offset = torch.empty((), dtype=torch.float32) if nested else None
                y = torch.empty(n, dtype=DTYPES[dt])
                with as_cuda(None):
                    grid, args, cx, opts = d4.plan(A, absmax, code2, absmax2, offset, y, 64, 256, qt)
                opts = _apply_warps(opts, num_warps)
                out.append(Launch(f"dequantize_4bit {qt} {dt} bs64 {'nested' if nested else 'plain'}",
                                  d4._dequantize_4bit_kernel, grid, args, cx, opts,
                                  2 * cx["ROWS"] * cx["COLS"]))  # fmt: skip
    return out


def dequantize_blockwise_launches(n: int, num_warps) -> list[Launch]:
    out = []
    code = formats.code_table("dynamic", torch.device("cpu"))
    for dt in ("bf16", "fp16", "fp32"):
        q = torch.empty(n, dtype=torch.uint8)
        absmax = torch.empty(-(-n // 4096), dtype=torch.float32)
        y = torch.empty(n, dtype=DTYPES[dt])
        rec = Recorder(b8._dequantize_blockwise_kernel)
        with as_cuda(None):
            b8.launch_dequantize(q, absmax, code, y, 4096, kernel=rec)
        ((grid, args, kwargs),) = rec.launches
        cx, opts = _split(kwargs)
        opts = _apply_warps(opts, num_warps)
        out.append(Launch(f"dequantize_blockwise {dt} bs4096", b8._dequantize_blockwise_kernel, grid, args, cx,
                          opts, cx["TILE_"]))  # fmt: skip
    return out


def linear_4bit_launches(n_rows: int, k: int, num_warps) -> list[Launch]:
    """The fused 4-bit linear's launches at M = 1, 2, 4 (the H100 table's configs, else the heuristic's: gemv2 and
    its split-K reduction) on an nf4 nested bs64 bf16 weight [n_rows, k]."""
    from tritonbits.ops import linear_4bit as l4

    w = _planned_weight(n_rows, k)
    out = []
    for m in (1, 2, 4):
        x2, y, cfg = _problem(m, n_rows, k, lambda mm: l4.heuristic_config(torch.bfloat16, mm, n_rows, k, 132))
        sm_count = l4._sm_count
        l4._sm_count = lambda device: 132  # type: ignore[assignment]  # the split-K reduction's grid as on an H100
        try:
            with as_cuda(None):
                launches, _ws = l4.fused_launches(x2, w, None, y, cfg, use_asm=True)
        finally:
            l4._sm_count = sm_count  # type: ignore[assignment]
        for la in launches:
            cx = la.constexprs
            values = cx["BLOCK_N"] * cx["BLOCK_K"] if "BLOCK_N" in cx else cx["BLOCK"]
            out.append(Launch(f"linear_4bit m{m} {la.fn.__name__}", la.fn, la.grid, la.args, cx,
                              _apply_warps(la.options, num_warps), values))  # fmt: skip
    return out


def linear_4bit_mma_launches(n_rows: int, k: int, num_warps) -> list[Launch]:
    """linear_4bit's Gluon "mma" kernel at M = 1, 4, 8, 16, 32, 64 with the H100 table's config, else the
    heuristic's (one launch with K warps, or the 8-split config), on an nf4 nested bs64 bf16 weight [n_rows, k];
    planned with `_mma_launches` (the op checks `mma_ok` on a GPU only). Needs a Triton with Gluon (the GPU
    machine's 3.6 on PYTHONPATH)."""
    from tritonbits.ops import linear_4bit as l4

    if l4.mma4.linear_4bit_mma_kernel is None:
        raise SystemExit("--mma: this Triton has no Gluon (put the GPU machine's 3.6 on PYTHONPATH: module doc)")
    w = _planned_weight(n_rows, k)
    out = []
    for m in (1, 4, 8, 16, 32, 64):
        x2, y, cfg = _problem(m, n_rows, k, lambda mm: l4.heuristic_mma_config(mm, n_rows, k) or {})
        if cfg.get("path") != "mma":  # a key the table gives another path (or the heuristic none: session 17's)
            cfg = l4.heuristic_mma_config(m, n_rows, k) or {"path": "mma", "warps": 4, "split_k": 8, "prefetch": True}
        la = next(la for la in l4._mma_launches(x2, w, None, y, cfg)[0] if la.fn is l4.mma4.linear_4bit_mma_kernel)
        # values a program: its W rows (16 a row group, warps / kwarps groups) x its split's K columns
        rows = 16 * la.constexprs["WARPS"] // la.constexprs["KWARPS"]
        out.append(Launch(f"linear_4bit m{m} mma {' '.join(f'{a}={b}' for a, b in cfg.items() if a != 'path')}",
                          la.fn, la.grid, la.args, la.constexprs, _apply_warps(la.options, num_warps),
                          rows * k // la.grid[1]))  # fmt: skip
    return out


def linear_4bit_wgmma_launches(n_rows: int, k: int, num_warps) -> list[Launch]:
    """linear_4bit's Gluon "wgmma" kernel (sm90) at M = 32, 64, 128, 256 with the H100 table's config, else the
    heuristic's, on an nf4 nested bs64 bf16 weight [n_rows, k]; planned with `_wgmma_launches` (the op checks
    `wgmma_ok` on an sm90 GPU only). Needs the GPU machine's 3.6 on PYTHONPATH."""
    from tritonbits.ops import linear_4bit as l4

    if l4.wg4.linear_4bit_wgmma_kernel is None:
        raise SystemExit("--wgmma: this Triton has no Gluon (put the GPU machine's 3.6 on PYTHONPATH: module doc)")
    w = _planned_weight(n_rows, k)
    out = []
    for m in (32, 64, 128, 256):
        x2, y, cfg = _problem(m, n_rows, k, lambda mm: l4.heuristic_wgmma_config(mm, n_rows, k))
        if cfg.get("path") != "wgmma":  # a key the table gives another path
            cfg = l4.heuristic_wgmma_config(m, n_rows, k)
        la = next(la for la in l4._wgmma_launches(x2, w, None, y, cfg)[0] if la.fn is l4.wg4.linear_4bit_wgmma_kernel)
        rows = 64 * la.constexprs["WG"]  # values a program: its W rows x its split's K columns
        out.append(Launch(f"linear_4bit m{m} wgmma {' '.join(f'{a}={b}' for a, b in cfg.items() if a != 'path')}",
                          la.fn, la.grid, la.args, la.constexprs, _apply_warps(la.options, num_warps),
                          rows * k // la.grid[2]))  # fmt: skip
    return out


def _problem(m: int, n_rows: int, k: int, fallback):
    """(x [m, k], out [m, n_rows], config) in bf16: the H100 table's config for the key, else `fallback(m)`."""
    from tritonbits.ops import linear_4bit as l4

    key = l4.config_key(torch.bfloat16, m, n_rows, k)
    cfg = configs.family_table("linear_4bit", "h100").get(key) or fallback(m)
    return torch.empty(m, k, dtype=torch.bfloat16), torch.empty(m, n_rows, dtype=torch.bfloat16), cfg


def _planned_weight(n_rows: int, k: int, dtype=torch.bfloat16, qt: str = "nf4", nested: bool = True, bs: int = 64):
    """A prepared weight [n_rows, k] of CPU tensors (planned only, never read): nf4 nested bs64 bf16 by default."""
    from tritonbits.quant_state import NestedState, QuantState, prepare

    cpu = torch.device("cpu")
    blocks = n_rows * k // bs
    state2 = None
    if nested:
        state2 = NestedState(absmax=torch.empty(-(-blocks // 256), dtype=torch.float32),
                             code=formats.code_table("dynamic", cpu))  # fmt: skip
    state = QuantState(absmax=torch.empty(blocks, dtype=torch.uint8 if nested else torch.float32),
                       shape=torch.Size((n_rows, k)), dtype=dtype, blocksize=bs, quant_type=qt,
                       offset=torch.zeros(()) if nested else None, state2=state2,
                       code=formats.code_table(qt, cpu))  # fmt: skip
    check_device = _runtime.check_device
    _runtime.check_device = lambda name, t, *_: t.device  # type: ignore[assignment]  # CPU tensors, planned only
    try:
        return prepare(torch.empty(n_rows * k // 2, 1, dtype=torch.uint8), state)
    finally:
        _runtime.check_device = check_device  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------------------
# Compile and count


def compile_launch(launch: Launch, target: GPUTarget):
    """triton.compile of exactly what `fn[grid](*args, **constexprs, **options)` would compile on `target`."""
    backend = make_backend(target)
    fn = launch.fn
    kwargs = {**launch.constexprs, **launch.options, "debug": False, "instrumentation_mode": "",
              "fpsan_homomorphic_casts": False}  # fmt: skip
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    if not hasattr(triton.knobs.compilation, "fpsan_homomorphic_casts"):  # triton < 3.9 (the GPU machine's 3.6)
        del kwargs["fpsan_homomorphic_casts"]
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    source = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():  # a Gluon kernel: its own AST source (explicit layouts)
        from triton.experimental.gluon._runtime import GluonASTSource

        source = GluonASTSource
    return triton.compile(source(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def tool_path(name: str) -> str:
    """A CUDA binary tool bundled with Triton (nvdisasm, cuobjdump)."""
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def disassemble(cubin: bytes) -> tuple[str, dict[str, int]]:
    """(nvdisasm's listing, cuobjdump's resource usage: REG, SHARED, LOCAL, ...) of a one-kernel cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.check_output([tool_path("nvdisasm"), "-c", f.name], text=True)
        res = subprocess.check_output([tool_path("cuobjdump"), "-res-usage", f.name], text=True)
    usage = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", res.split("Function", 1)[-1])}
    return sass, usage


def parse(sass: str) -> tuple[list[tuple[int, str, str]], dict[str, int]]:
    """One kernel's disassembly as its instructions (address, opcode, operands) and its labels' addresses."""
    instrs: list[tuple[int, str, str]] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in sass.splitlines():
        m = LABEL.match(line.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = INSTR.match(line)
        if not m:
            continue
        addr, op, rest = int(m.group(1), 16), m.group(3), m.group(4)
        for lab in pending:
            labels[lab] = addr
        pending = []
        instrs.append((addr, op, rest))
    return instrs, labels


def count(sass: str) -> dict:
    """Instruction counts of one kernel's disassembly (see the module doc for what is counted)."""
    instrs, labels = parse(sass)
    last_exit = max((a for a, op, _ in instrs if op == "EXIT"), default=-1)
    body = [(a, op, rest) for a, op, rest in instrs if op != "NOP"]
    # the trailing self-branch after the last EXIT is padding, not code
    body = [(a, op, rest) for a, op, rest in body if not (op == "BRA" and a > last_exit)]
    loop_addrs: set[int] = set()
    for a, op, rest in body:
        if op == "BRA":
            m = re.search(r"\((\.L_x_\d+)\)", rest)
            if m and labels.get(m.group(1), a + 1) <= a:
                loop_addrs.update(x for x, _, _ in body if labels[m.group(1)] <= x <= a)
    ops = Counter(op.split(".")[0] for _, op, _ in body)
    return {"total": len(body), "loop": len(loop_addrs) or None, "opcodes": dict(ops.most_common())}


CLASSES = {"LDG": "ldg", "STG": "stg", "LDS": "lds", "STS": "sts", "BAR": "bar", "SHFL": "shfl",
           "F2I": "cvt", "I2F": "cvt", "F2F": "cvt", "F2FP": "cvt", "MUFU": "mufu"}  # fmt: skip


def measure(launch: Launch, target: GPUTarget, dump: Path | None) -> dict:
    kernel = compile_launch(launch, target)
    sass, usage = disassemble(kernel.asm["cubin"])
    c = count(sass)
    warps = launch.options.get("num_warps", 4)
    per_thread = launch.values / (warps * 32)
    classes: Counter = Counter()
    for op, k in c["opcodes"].items():
        if op in CLASSES:
            classes[CLASSES[op]] += k
    if dump is not None:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", launch.name)
        (dump / f"{stem}.sass").write_text(sass)
        (dump / f"{stem}.ptx").write_text(kernel.asm["ptx"])
        (dump / f"{stem}.ttgir").write_text(kernel.asm["ttgir"])
    return {"name": launch.name, "kernel": launch.fn.__name__, "total": c["total"], "loop": c["loop"],
            "per_value": c["total"] / per_thread, "values_per_program": launch.values, "num_warps": warps,
            "values_per_thread": per_thread, "registers": usage.get("REG"), "local_bytes": usage.get("LOCAL"),
            "shared_bytes": usage.get("SHARED"),
            "classes": dict(classes), "opcodes": c["opcodes"], "grid": list(launch.grid),
            "constexprs": {k: v for k, v in launch.constexprs.items()}, **launch.extra}  # fmt: skip


def parse_shape(s: str) -> int:
    n = 1
    for part in s.lower().split("x"):
        n *= int(part)
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout instead of the table")
    parser.add_argument("--only", action="append", default=[], help="keep configs whose name contains this "
                        "(all given substrings, space-separated words each)")  # fmt: skip
    parser.add_argument("--arch", type=int, default=90, help="CUDA capability as an int (90: sm90)")
    parser.add_argument("--shape", default="4096x4096", help="4-bit launches' element count (default 4096x4096)")
    parser.add_argument("--shape-8bit", default=str(1 << 26), help="8-bit launches' element count (default 2^26)")
    parser.add_argument("--rcp", choices=b8.RCP_MODES, help=f"quantizers' reciprocal (default {b8.RCP_GPU!r})")
    parser.add_argument("--num-warps", type=int, help="override every launch's warps")
    parser.add_argument("--dump", type=Path, help="write each config's .sass, .ptx and .ttgir here")
    parser.add_argument("--mma", action="store_true", help="also linear_4bit's Gluon mma kernel at M = 1..64 "
                        "(needs Gluon: the GPU machine's Triton 3.6 on PYTHONPATH)")  # fmt: skip
    parser.add_argument("--wgmma", action="store_true", help="also linear_4bit's Gluon wgmma kernel (sm90) at M = "
                        "32..256 (needs Gluon: the GPU machine's Triton 3.6 on PYTHONPATH)")  # fmt: skip
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        print("note: a CUDA device is present; compiling offline for the --arch target anyway", file=sys.stderr)
    target = GPUTarget("cuda", args.arch, 32)
    n4, n8 = parse_shape(args.shape), parse_shape(args.shape_8bit)
    warps = args.num_warps
    launches = quantize_4bit_launches(n4, args.rcp, warps, q4.ENCODERS)
    launches += quantize_blockwise_launches(n8, args.rcp, warps, b8.ENCODERS)
    launches += dequantize_4bit_launches(n4, warps) + dequantize_blockwise_launches(n8, warps)
    dims = [int(v) for v in args.shape.lower().split("x")]
    if len(dims) == 2:  # linear_4bit's weight is N x K
        launches += linear_4bit_launches(dims[0], dims[1], warps)
        if args.mma:
            launches += linear_4bit_mma_launches(dims[0], dims[1], warps)
        if args.wgmma:
            launches += linear_4bit_wgmma_launches(dims[0], dims[1], warps)
    words = [w for o in args.only for w in o.split()]
    launches = [la for la in launches if all(w in la.name for w in words)]
    if args.dump is not None:
        args.dump.mkdir(parents=True, exist_ok=True)
    rows = []
    for la in launches:
        try:
            rows.append(measure(la, target, args.dump))
        except Exception as exc:  # one config failing to compile must not hide the others
            rows.append({"name": la.name, "error": f"{type(exc).__name__}: {exc}"})
        if not args.json:
            r = rows[-1]
            if "error" in r:
                print(f"{r['name']:<52} ERROR {r['error']}", flush=True)
                continue
            if len(rows) == 1:
                print(f"{'config (sm' + str(args.arch) + ')':<52} {'instr':>6} {'loop':>5} {'/value':>7} "
                      f"{'val/thr':>7} {'warps':>5} {'regs':>4}  ldg/stg/lds/sts/bar/shfl/cvt/mufu")  # fmt: skip
            cl = r["classes"]
            mix = "/".join(str(cl.get(k, 0)) for k in ("ldg", "stg", "lds", "sts", "bar", "shfl", "cvt", "mufu"))
            print(f"{r['name']:<52} {r['total']:>6} {r['loop'] or '-':>5} {r['per_value']:>7.2f} "
                  f"{r['values_per_thread']:>7g} {r['num_warps']:>5} {r['registers']:>4}  {mix}",
                  flush=True)  # fmt: skip
    if args.json:
        meta = {"arch": f"sm{args.arch}", "triton": triton.__version__, "torch": torch.__version__,
                "shape_4bit": n4, "shape_8bit": n8, "rcp": args.rcp or b8.RCP_GPU,
                "num_warps": args.num_warps}  # fmt: skip
        json.dump({"meta": meta, "configs": rows}, sys.stdout, indent=1)
        print()
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The PYTHON HOST COST of one eager `tritonbits.linear_4bit` call, measured on the CPU, with no GPU: what the
call costs before any kernel runs (validation, the quant-state cache, config lookup, allocations, argument
building, the launcher's cache key), piece by piece. It says nothing about GPU time, and a GPU host's Python
runs at its own speed (the H100 machine measured ~2x slower than this one on some pieces): compare figures
taken by this script on one machine only. GPU timings: ci/host_overhead.py.

How: TRITON_INTERPRET=1 (so CPU tensors pass validation), and the direct-launch machinery switched on with
`tritonbits_harness.launch_stub.stubbed_launches(execute=False)`: every CachedLauncher is enabled as on a GPU,
its first launch of a specialization caches a stand-in CompiledKernel instead of compiling, and the raw launch
(`_launcher._raw_launch`: the CUDA stream lookup and `CompiledKernel.run`) returns at once. Everything else of
the eager path runs as on a GPU, with these stand-ins, each also a GPU-side cost that this script cannot see:

- the config table is the H100's (`_runtime.gpu_family` -> "h100") and the SM count 132; bf16 rounding native
  (`_runtime.native_bf16_conversion` -> True, as on sm80+);
- the interpreter keeps `use_asm` off, so the kernels' options carry one more item (`enable_fp_fusion`);
- the dequant path's `F.linear` (a cuBLAS launch on a GPU; the same call bnb's path makes) is stubbed: on the
  CPU it would run the product;
- `torch.empty` is the CPU allocator, not CUDA's caching allocator (listed as its own piece; the dequant path's
  [N, K] weight buffer is a large CPU allocation and dominates that path here).

    TRITON_INTERPRET=1 uv run python ci/linear4bit_host_probe.py [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import statistics
import timeit

os.environ["TRITON_INTERPRET"] = "1"  # before tritonbits is imported: CPU tensors are kernel arguments then

import torch

import tritonbits
from tritonbits import _launcher, _runtime, formats
from tritonbits.ops import dequantize_4bit as dq
from tritonbits.ops import linear_4bit as L
from tritonbits.quant_state import NestedState, QuantState
from tritonbits_harness.launch_stub import stubbed_launches

DEVICE = torch.device("cpu")
SMS = 132  # H100 SXM


def weight(n: int, k: int) -> tuple[torch.Tensor, QuantState]:
    """A packed nf4 weight [N, K] with a nested absmax at blocksize 64, bnb's layout (values do not matter: no
    kernel runs)."""
    blocks = n * k // 64
    state = QuantState(
        absmax=torch.zeros(blocks, dtype=torch.uint8),
        shape=torch.Size([n, k]),
        dtype=torch.bfloat16,
        blocksize=64,
        quant_type="nf4",
        offset=torch.tensor(0.0),
        state2=NestedState(absmax=torch.ones(-(-blocks // 256)), code=formats.dynamic_code()),
    )
    return torch.zeros(n * k // 2, 1, dtype=torch.uint8), state


def per_call_us(fn, number: int, repeat: int = 7) -> float:
    """Median over `repeat` runs of the mean time of `number` back-to-back calls, in microseconds."""
    return statistics.median(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def capture_launches(call) -> list[tuple]:
    """The (launcher, grid, args, constexprs, options, device) of every CachedLauncher call `call` makes."""
    seen: list[tuple] = []
    original = _launcher.CachedLauncher.__call__

    def spy(self, grid, args, constexprs, options, device):
        seen.append((self, grid, args, constexprs, options, device))
        return original(self, grid, args, constexprs, options, device)

    _launcher.CachedLauncher.__call__ = spy  # type: ignore[method-assign]
    try:
        call()
    finally:
        _launcher.CachedLauncher.__call__ = original  # type: ignore[method-assign]
    return seen


def pieces(x: torch.Tensor, A: torch.Tensor, qs: QuantState, bias, number: int) -> dict[str, float]:
    """Each piece of the eager path timed alone (the same calls the path makes, on the same objects)."""
    w = L._prepare(A, qs)
    state = w.state
    n, k = state.shape
    x2 = L._flatten(x)
    m = x2.shape[0]
    cfg = L.config_for(DEVICE, x.dtype, m, n, k)
    out: dict[str, float] = {}

    def t(name, fn):
        out[name] = per_call_us(fn, number)

    t("_resolve", lambda: L._resolve(A, qs))
    t("torch.compiler.is_compiling", torch.compiler.is_compiling)
    t("_prepare (cache hit)", lambda: L._prepare(A, qs))
    t("_check_x_bias", lambda: L._check_x_bias(x, bias, state, A.device))
    t(
        "needs_grad test",
        lambda: torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)),
    )
    t("_flatten (x.reshape)", lambda: L._flatten(x))
    t("config_for", lambda: L.config_for(DEVICE, x.dtype, m, n, k))
    t("fused_ok", lambda: L.fused_ok(cfg, k))
    t("torch.empty out [M, N]", lambda: torch.empty((m, n), dtype=x.dtype, device=DEVICE))
    if cfg.get("path") == "mma":  # the table's mma config (no K chunk; the interpreter takes the fallback)
        pass
    elif L.fused_ok(cfg, k):
        bk = L.effective_bk(cfg, k)
        t("effective_bk", lambda: L.effective_bk(cfg, k))
        t("words_of (address_aligned, view)", lambda: L.words_of(w))
        t(
            "_sm_count + gemv2_rows (a config without 'rows' only)",
            lambda: L.gemv2_rows(
                m, n, k // bk, cfg["bn"], L._sm_count(DEVICE), cfg.get("per_sm", L.GEMV2_PROGRAMS_PER_SM)
            ),
        )
        t("native_bf16_conversion", lambda: _runtime.native_bf16_conversion(DEVICE))
        t("formats.code_table", lambda: formats.code_table(state.quant_type, DEVICE))
        if k // bk > 1:
            t("torch.empty workspace [S, M, N] fp32", lambda: torch.empty((k // bk, m, n), dtype=torch.float32))
    else:
        t("torch.empty W [N, K] (dequant path; CPU malloc)", lambda: torch.empty((n, k), dtype=state.dtype))
    out2 = torch.empty((m, n), dtype=x.dtype)
    t("out.reshape to x's leading dims", lambda: out2.reshape(*x.shape[:-1], n))
    for i, launch in enumerate(capture_launches(lambda: tritonbits.linear_4bit(x, A, qs, bias))):
        launch_pieces(t, i, *launch)
    if hasattr(L, "_plan_key"):  # the eager plans (after git ca751b0)
        t("_plan_key", lambda: L._plan_key(x, bias))
        plan = w.launches["linear_4bit"][L._plan_key(x, bias)]
        t("plan.run (allocations + bound launches)", lambda: plan.run(x, bias))
    t("forward_2d (the unplanned launch path)", lambda: L.forward_2d(x2, w, bias))
    t("tritonbits.linear_4bit (whole eager call)", lambda: tritonbits.linear_4bit(x, A, qs, bias))
    return out


def launch_pieces(t, i: int, launcher, grid, args, constexprs, options, device) -> None:
    """One captured launch: its launcher key, the cached launcher call, and the same launch bound."""
    name = f"launch {i + 1} ({launcher.fn.__name__.strip('_')})"
    t(f"{name}: CachedLauncher.key", lambda: launcher.key(args, constexprs, options, device))
    t(f"{name}: CachedLauncher call (key + lookup + stubbed raw launch)",
      lambda: launcher(grid, args, constexprs, options, device))  # fmt: skip
    bound = launcher.bind(grid, args, constexprs, options, device, slots=(0,))
    if bound is not None:
        t(f"{name}: BoundLaunch call, one slot (stubbed raw launch)", lambda: bound(args[0]))


CASES = [  # (label, x shape, N, K, bias)
    ("M=1 x[1,4096] W 14336x4096 (gemv2, 32 K chunks + reduce)", (1, 4096), 14336, 4096, False),
    ("M=1 x[1,1,4096] W 14336x4096, bias", (1, 1, 4096), 14336, 4096, True),
    ("M=1 x[1,14336] W 4096x14336 (gemv2, 14 K chunks + reduce)", (1, 14336), 4096, 14336, False),
    ("M=2 x[2,1,4096] W 14336x4096 (gemv2)", (2, 1, 4096), 14336, 4096, False),
    ("M=4 x[4,1,4096] W 14336x4096 (gemv2)", (4, 1, 4096), 14336, 4096, False),
    ("M=16 x[16,1,4096] W 14336x4096 (dequantize + F.linear)", (16, 1, 4096), 14336, 4096, False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls per timing (noisier)")
    parser.add_argument("--profile", action="store_true", help="also a cProfile (tottime) of each case's calls")
    parser.add_argument("--only", type=int, nargs="*", help="case indices to run")
    ns = parser.parse_args()
    number = 500 if ns.quick else 3000

    # the H100's config table and SM count; native bf16 rounding (sm80+)
    _runtime.gpu_family = lambda device: "h100"  # type: ignore[assignment]
    L._tuned.cache_clear()
    L._sm_count = functools.cache(lambda device: SMS)  # type: ignore[assignment]
    _runtime.native_bf16_conversion = lambda device: True  # type: ignore[assignment]
    L.matmul_dequantized = lambda x2, wd, bias: torch.empty((x2.shape[0], wd.shape[0]), dtype=x2.dtype)

    launchers = [*L._LAUNCHERS.values(), dq._launcher]
    print(f"torch {torch.__version__}; Python host cost per piece, CPU only, microseconds (median of 7 x {number})")
    with torch.no_grad(), stubbed_launches(launchers, execute=False) as log:
        for i, (label, x_shape, n, k, with_bias) in enumerate(CASES):
            if ns.only and i not in ns.only:
                continue
            A, qs = weight(n, k)
            x = torch.randn(x_shape).to(torch.bfloat16)
            bias = torch.randn(n).to(torch.bfloat16) if with_bias else None
            for _ in range(3):  # first calls: prepare, the stand-in compile, plans and binds
                tritonbits.linear_4bit(x, A, qs, bias)
            print(f"\n== {label}")
            for name, us in pieces(x, A, qs, bias, number).items():
                print(f"  {us:8.2f}  {name}")
            if ns.profile:
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(number):
                    tritonbits.linear_4bit(x, A, qs, bias)
                prof.disable()
                print(f"  cProfile of {number} calls (its own overhead inflates every figure), by tottime:")
                pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    print(f"\n(stubbed raw launches: {log.raw}; stand-in compiles: {log.jit})")


if __name__ == "__main__":
    main()

"""The PYTHON HOST COST of one eager `tritonbits.dequant_bias` call, measured on the CPU with no GPU, next to the
stubbed cost of a bare launch measured in the same process, interleaved (issue 15: eager host time at M <= 128
at most 1.3x a bare Triton launch's; the GPU figure is ci/host_overhead.py's).

How: TRITON_INTERPRET=1 (CPU tensors pass validation) and `tritonbits_harness.launch_stub.stubbed_launches(
execute=False)`: every CachedLauncher is enabled as on a GPU, a specialization's first launch caches a stand-in
CompiledKernel instead of compiling, and the raw launch (`_launcher._raw_launch`: the CUDA stream lookup and
`CompiledKernel.run`) returns at once. So every figure here is the Python around the raw launch. A GPU pays the
raw launch in dequant_bias and in a bare launch alike (adding the same time to both sides of a ratio brings it
closer to 1), so these ratios are not issue 15's figure: that is ci/host_overhead.py's, on a GPU. The H100's config
table and native bf16 rounding are used (`_runtime.gpu_family` -> "h100", `native_bf16_conversion` -> True);
`torch.empty` is the CPU allocator (CUDA's caching allocator measured 5.3 us on the H100 machine: a GPU-side cost
this cannot see), timed as its own row.

Rows per case, each the min and the median over --repeat rounds of the mean of --number back-to-back calls, all
rows of a round interleaved (the CPU is shared and noisy: the min is the least disturbed figure; compare ratios
taken in one run):
- `bare: empty kernel, CachedLauncher call`: the launcher's key + lookup + stubbed raw launch of
  `_empty(x_ptr, n)`, the lightest launch a tritonbits op can make;
- `bare: empty kernel, BoundLaunch`: the same launch bound (one slot);
- `floor: the plan's BoundLaunch (5 slots) [+ torch.empty]`: what a call must do at least, given its plan;
- `tritonbits.dequant_bias`: the whole eager call.
Ratios: dequant_bias's min over the row's min, and the median of the per-round ratios.

    TRITON_INTERPRET=1 uv run python ci/dequant_bias_host_probe.py [--profile] [--quick]
    # before/after: each tree in its own process, alternating, --rounds times
    uv run python ci/dequant_bias_host_probe.py --compare /work/main/packages/kernels/src packages/kernels/src
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import timeit

os.environ["TRITON_INTERPRET"] = "1"  # before tritonbits is imported: CPU tensors are kernel arguments then

CASES = [  # (label, M, N, acc dtype, bias, out=: None | "new" | "acc")
    ("M=1 N=4096 int32 +bias", 1, 4096, "int32", True, None),
    ("M=16 N=4096 int32", 16, 4096, "int32", False, None),
    ("M=128 N=4096 int32 +bias", 128, 4096, "int32", True, None),
    ("M=128 N=4096 int32 +bias out=", 128, 4096, "int32", True, "new"),
    ("M=128 N=4096 fp32 +bias out=acc", 128, 4096, "float32", True, "acc"),
]


def per_call_us(fn, number: int) -> float:
    return timeit.timeit(fn, number=number) / number * 1e6


def run_tree(ns) -> dict:
    """Time every case of the tree that `import tritonbits` finds; return {case: {row: [us per round]}}."""
    import torch
    import triton

    import tritonbits
    from tritonbits import _launcher, _runtime
    from tritonbits.ops import dequant_bias as db
    from tritonbits_harness.launch_stub import stubbed_launches

    @triton.jit
    def _empty(x_ptr, n):
        pass

    _runtime.gpu_family = lambda device: "h100"  # type: ignore[assignment]
    _runtime.native_bf16_conversion = lambda device: True  # type: ignore[assignment]
    db._config.cache_clear()
    cpu = torch.device("cpu")
    empty = _launcher.CachedLauncher(_empty)
    x = torch.empty(16)
    results: dict[str, dict[str, list[float]]] = {}
    print(f"tritonbits from {tritonbits.__file__}", file=sys.stderr)
    # grad mode on, as in ci/host_overhead.py (the inputs do not require grad)
    with stubbed_launches([db._launcher, db._launcher_1d, empty], execute=False) as log:
        empty((1, 1, 1), (x, 16), {}, {}, cpu)
        bare_bound = empty.bind((1, 1, 1), (x, 16), {}, {}, cpu, slots=(0,))
        rows_of = {}
        for label, m, n, acc_dtype, with_bias, out_kind in CASES:
            dtype = getattr(torch, acc_dtype)
            acc = torch.randint(-100, 100, (m, n), dtype=torch.int32).to(dtype)
            sa, sb = torch.rand(m, 1), torch.rand(1, n)
            bias = torch.rand(n).to(torch.bfloat16) if with_bias else None
            out = {None: None, "new": torch.empty(m, n, dtype=torch.bfloat16), "acc": acc}[out_kind]
            out_dtype = torch.bfloat16 if out is None else out.dtype

            def call(acc=acc, sa=sa, sb=sb, bias=bias, out=out):
                return tritonbits.dequant_bias(acc, sa, sb, bias, out=out)

            for _ in range(3):  # stand-in compile, plan, bind
                call()
            # the floor: this case's own launch, bound with its five tensors as slots
            out_t = out if out is not None else torch.empty(m, n, dtype=out_dtype)
            strides = db.validate(acc, sa, sb, bias, out_dtype, out_t)
            p = db.plan(acc, sa, sb, bias, out_t, *strides)
            bound = p.launcher.bind(p.grid, p.args, p.constexprs, p.options, cpu, slots=(0, 1, 2, 3, 4))
            bias_arg = bias if bias is not None else sb
            if out is None:
                floor_name = "floor: the plan's BoundLaunch (5 slots) + torch.empty"

                def floor(acc=acc, sa=sa, sb=sb, bias_arg=bias_arg, bound=bound, m=m, n=n, dt=out_dtype):
                    o = torch.empty(m, n, dtype=dt, device=cpu)  # the sizes as ints, as the fast path passes them
                    bound(acc, sa, sb, bias_arg, o)
                    return o
            else:
                floor_name = "floor: the plan's BoundLaunch (5 slots)"

                def floor(acc=acc, sa=sa, sb=sb, bias_arg=bias_arg, bound=bound, out=out):
                    bound(acc, sa, sb, bias_arg, out)
                    return out

            def alloc(m=m, n=n):
                return torch.empty(m, n, dtype=torch.bfloat16, device=cpu)

            rows_of[label] = {
                "bare: empty kernel, CachedLauncher call": lambda: empty((1, 1, 1), (x, 16), {}, {}, cpu),
                "bare: empty kernel, BoundLaunch": lambda: bare_bound(x),
                "torch.empty [M, N] bf16 (CPU allocator)": alloc,
                floor_name: floor,
                "tritonbits.dequant_bias": call,
            }
            results[label] = {name: [] for name in rows_of[label]}
        jit_before = log.jit
        for _ in range(ns.repeat):
            for label, rows in rows_of.items():
                for name, fn in rows.items():
                    results[label][name].append(per_call_us(fn, ns.number))
        assert log.jit == jit_before, "a timed call went through the JIT entry: the fast path was not taken"
        if ns.profile:
            for label, rows in rows_of.items():
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(ns.number):
                    rows["tritonbits.dequant_bias"]()
                prof.disable()
                print(f"\n== cProfile of {ns.number} calls, {label} (its overhead inflates every figure), tottime:")
                pstats.Stats(prof).sort_stats("tottime").print_stats(16)
    return results


def report(results: dict, title: str) -> None:
    rounds = len(next(iter(next(iter(results.values())).values())))
    print(f"\n{title}: microseconds per call over {rounds} rounds, min and median; dequant_bias / row: ratio of the "
          "mins, and the median of the per-round ratios")  # fmt: skip
    for label, rows in results.items():
        print(f"== {label}")
        ours = rows["tritonbits.dequant_bias"]
        for name, values in rows.items():
            ratio = ""
            if not name.startswith("tritonbits"):
                per_round = [a / b for a, b in zip(ours, values, strict=True)]
                ratio = f"  dequant_bias/this {min(ours) / min(values):5.2f}x, {statistics.median(per_round):5.2f}x"
            print(f"  {min(values):7.2f} {statistics.median(values):7.2f}  {name}{ratio}")


def compare(ns) -> None:
    """Each tree in its own process (PYTHONPATH puts it first), alternating, ns.rounds times."""
    merged: dict[str, dict] = {tree: {} for tree in ns.compare}
    here = os.path.dirname(os.path.abspath(__file__))
    extra = [os.path.join(here, "..", "packages", p, "src") for p in ("harness", "reference")]
    for _ in range(ns.rounds):
        for tree in ns.compare:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, *extra]), TRITON_INTERPRET="1")
            args = [sys.executable, __file__, "--json", "--number", str(ns.number), "--repeat", str(ns.repeat)]
            out = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
            for label, rows in json.loads(out.splitlines()[-1]).items():
                for name, values in rows.items():
                    merged[tree].setdefault(label, {}).setdefault(name, []).extend(values)
    for tree in ns.compare:
        report(merged[tree], f"tree {tree}")
    a, b = ns.compare
    print(f"\n{a} -> {b}, tritonbits.dequant_bias:")
    for label in merged[a]:
        ta, tb = merged[a][label]["tritonbits.dequant_bias"], merged[b][label]["tritonbits.dequant_bias"]
        print(f"  {label}: min {min(ta):.2f} -> {min(tb):.2f} us ({min(tb) / min(ta):.2f}x), "
              f"median {statistics.median(ta):.2f} -> {statistics.median(tb):.2f} us")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls per timing (noisier)")
    parser.add_argument("--profile", action="store_true", help="also a cProfile (tottime) of each case's calls")
    parser.add_argument("--number", type=int, default=None, help="calls per timing (default 1000; --quick 300)")
    parser.add_argument("--repeat", type=int, default=15, help="rounds of interleaved timings")
    parser.add_argument("--compare", nargs=2, metavar="KERNELS_SRC", help="two tritonbits src trees, before after")
    parser.add_argument("--rounds", type=int, default=3, help="--compare: processes per tree, alternating")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    ns.number = ns.number or (300 if ns.quick else 1000)
    if ns.compare:
        compare(ns)
        return
    results = run_tree(ns)
    if ns.json:
        print(json.dumps(results))
    else:
        report(results, "this tree")


if __name__ == "__main__":
    main()

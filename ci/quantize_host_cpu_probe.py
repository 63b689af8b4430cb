"""The PYTHON HOST COST of eager `tritonbits.quantize_4bit` (plain and compress_statistics=True, NF4 and FP4) and
`tritonbits.quantize_blockwise`, measured on the CPU with no GPU, and two source trees compared side by side.
It says nothing about GPU time, and a GPU host's Python runs at its own speed: compare figures taken by this
script on one machine, in one run, only. GPU host timings: ci/quantize_host_probe.py.

How (as ci/linear4bit_host_probe.py): TRITON_INTERPRET=1 (so CPU tensors pass validation), and every
CachedLauncher of tritonbits.ops switched on by `tritonbits_harness.launch_stub.stubbed_launches(execute=False)`:
the first launch of a specialization caches a stand-in CompiledKernel instead of compiling, later launches take
the direct path (or a bound launch) up to the raw launch, which returns at once. What differs from a GPU host:
`torch.empty` is the CPU allocator, and the nested path's `absmax.mean()` (a launch on a GPU) sums its values on
the CPU here, so the nested cases use a small weight (SHAPES) to keep that sum a few microseconds
(quantize_blockwise's nested mean sums one value per 4096). The interpreter's device is "cpu": the reciprocal
mode is "plain", FTZ "emulate", the SM count 1 (one more constexpr value each, no other path).

Timed as this process's CPU time (time.process_time), one torch thread, denormals flushed: on the shared 2-core
machine wall time doubled whenever another process shared the core (bimodal runs, 14 or 28 us for one case), a
parallel CPU mean waited for its second thread, and the mean of never-written memory (no kernel writes the
absmax) ran up to ~1000x slower on denormal garbage. CPU time is stable to a few percent across runs.

One tree (the one on PYTHONPATH, or this checkout):

    TRITON_INTERPRET=1 uv run python ci/quantize_host_cpu_probe.py [--profile CASE]

Two trees, interleaved (a subprocess per tree per round, ROUNDS rounds, the order alternating; per case the
median over rounds of each round's median, and the ratio of the medians):

    uv run python ci/quantize_host_cpu_probe.py --compare /tmp/base/packages/kernels/src packages/kernels/src
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
import time
import timeit
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before tritonbits is imported: CPU tensors are kernel arguments then

SHAPES = {"small": (256, 4096), "mid": (1024, 4096)}  # bf16 weights [rows, 4096]; blocksize 64 (4-bit)


def cases():
    """(name, shape key, call) for every timed call."""
    import tritonbits

    out = []
    for shape in SHAPES:
        for qt in ("nf4", "fp4"):
            for nested in (False, True):
                name = f"q4 {qt} {'nested' if nested else 'plain'} {shape}"

                def call(x, qt=qt, nested=nested):
                    return tritonbits.quantize_4bit(x, blocksize=64, quant_type=qt, compress_statistics=nested)

                out.append((name, shape, call))
        out.append((f"q8 blockwise {shape}", shape, lambda x: tritonbits.quantize_blockwise(x)))
        out.append((f"q8 blockwise nested {shape}", shape, lambda x: tritonbits.quantize_blockwise(x, nested=True)))
    return out


def launchers():
    """Every CachedLauncher in tritonbits.ops' modules (whatever the tree calls them)."""
    from tritonbits import _launcher

    found = []
    for mod_name in ("blockwise_8bit", "quantize_4bit", "dequantize_4bit"):
        mod = __import__(f"tritonbits.ops.{mod_name}", fromlist=["_"])
        found += [v for v in vars(mod).values() if isinstance(v, _launcher.CachedLauncher)]
    return list({id(lc): lc for lc in found}.values())


def measure(number: int, repeat: int, only: str | None, profile: str | None) -> dict[str, float]:
    import torch

    import tritonbits
    from tritonbits_harness.launch_stub import stubbed_launches

    # no kernel runs, so the nested path's absmax.mean() sums never-written memory: denormal garbage there slowed
    # that CPU sum by up to ~1000x (7.9 ms a call at 1024x4096); flushed, the sum costs what it costs on any data
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)  # a parallel CPU sum waits for a second thread, seconds late on a loaded machine
    torch.manual_seed(0)
    xs = {k: torch.randn(*s).to(torch.bfloat16) for k, s in SHAPES.items()}
    result: dict[str, float] = {"_file": tritonbits.__file__}  # type: ignore[dict-item]
    with torch.no_grad(), stubbed_launches(launchers(), execute=False) as log:
        for name, shape, call in cases():
            if only and only not in name:
                continue
            x = xs[shape]
            for _ in range(5):  # first calls: tables, the stand-in compile, binds
                call(x)
            runs = timeit.repeat(lambda call=call, x=x: call(x), number=number, repeat=repeat, timer=time.process_time)
            result[name] = statistics.median(runs) / number * 1e6
            if profile and profile in name:
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(number):
                    call(x)
                prof.disable()
                print(f"== cProfile of {number} calls of {name} (its own overhead inflates every figure), by tottime:")
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if log.raw == 0:
        raise AssertionError("no direct launch ran: the stub did not take the launchers' fast path")
    return result


def compare(trees: list[str], rounds: int, number: int, repeat: int, only: str | None) -> None:
    here = Path(__file__).resolve()
    harness = str(here.parent.parent / "packages" / "harness" / "src")
    samples: dict[str, dict[str, list[float]]] = {t: {} for t in trees}
    for r in range(rounds):
        order = trees if r % 2 == 0 else trees[::-1]
        for tree in order:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tree).resolve()), harness])}
            cmd = [sys.executable, str(here), "--json", "--number", str(number), "--repeat", str(repeat)]
            if only:
                cmd += ["--only", only]
            got = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
            file = got.pop("_file")
            if not file.startswith(str(Path(tree).resolve())):
                raise AssertionError(f"{tree}: imported tritonbits from {file}")
            for name, us in got.items():
                samples[tree].setdefault(name, []).append(us)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    a, b = trees
    print(f"host us per call, CPU, stubbed launches; median of {rounds} rounds (each the median of {repeat} x "
          f"{number} calls)\n  A = {a}\n  B = {b}")  # fmt: skip
    print(f"{'case':34s} {'A us':>8s} {'B us':>8s} {'B/A':>6s}   B/A per round")
    for name in samples[a]:
        ma, mb = statistics.median(samples[a][name]), statistics.median(samples[b][name])
        per_round = " ".join(f"{y / x:.2f}" for x, y in zip(samples[a][name], samples[b][name], strict=True))
        print(f"{name:34s} {ma:8.1f} {mb:8.1f} {mb / ma:6.2f}   {per_round}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=300, help="calls per timing")
    parser.add_argument("--repeat", type=int, default=5, help="timings per case (median)")
    parser.add_argument("--only", help="cases whose name contains this")
    parser.add_argument("--profile", help="also cProfile the cases whose name contains this")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for --compare)")
    parser.add_argument("--compare", nargs=2, metavar=("SRC_A", "SRC_B"), help="two kernels src/ trees")
    parser.add_argument("--rounds", type=int, default=5, help="--compare: rounds (subprocess per tree each)")
    ns = parser.parse_args()
    if ns.compare:
        compare(ns.compare, ns.rounds, ns.number, ns.repeat, ns.only)
        return
    result = measure(ns.number, ns.repeat, ns.only, ns.profile)
    if ns.json:
        print(json.dumps(result))
        return
    print(f"tritonbits from {result.pop('_file')}; host us per call (median of {ns.repeat} x {ns.number})")
    for name, us in result.items():
        print(f"  {us:8.1f}  {name}")


if __name__ == "__main__":
    main()

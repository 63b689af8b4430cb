"""Host time of eager tritonbits.quantize_4bit (and quantize_blockwise) on a GPU machine, for the tree on PYTHONPATH
(run it once per tree, interleaved, to compare two commits on one machine): per case the unsynced host time of one
call (timing.host_us), the do_bench launch-mode and CUDA-graph medians, then a cProfile of 2000 plain NF4 calls.
The same calls' Python host cost on a machine without a GPU (stubbed launches, two trees compared in one run):
ci/quantize_host_cpu_probe.py.

    PYTHONPATH=/tmp/site:<kernels src>:packages/reference/src:packages/harness/src python3 ci/quantize_host_probe.py
"""

import torch

import tritonbits
from tritonbits_harness import timing

print("tritonbits from", tritonbits.__file__)
x = torch.randn(4096, 4096, device="cuda").to(torch.bfloat16)
x14 = torch.randn(14336, 4096, device="cuda").to(torch.bfloat16)


def report(label: str, f) -> None:
    """Host time of one unsynced call, then the launch-mode and CUDA-graph medians of f (warmed: planned, bound)."""
    f()
    f()
    torch.cuda.synchronize()
    h = timing.host_us(f, n=1000)
    torch.cuda.synchronize()
    lm = timing.bench(f, rep=20) * 1000
    gm = timing.bench_graph(f, rep=20) * 1000
    print(f"{label}: host {h:.1f} us, launch {lm:.1f} us, graph {gm:.1f} us")


for name, xx in (("4096", x), ("14336", x14)):
    for qt, nested in (("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)):
        report(
            f"{name} {qt} nested={nested}",
            lambda xx=xx, qt=qt, nested=nested: tritonbits.quantize_4bit(
                xx, blocksize=64, quant_type=qt, compress_statistics=nested
            ),
        )
for name, xx in (("4096", x), ("14336", x14)):
    report(f"{name} quantize_blockwise bs4096", lambda xx=xx: tritonbits.quantize_blockwise(xx))
f = lambda: tritonbits.quantize_4bit(x, blocksize=64, quant_type="nf4")
timing.print_profile(f, 2000, 12)

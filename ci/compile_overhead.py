"""Where the host time of a compiled MLP forward goes (run on a GPU machine): the mlp_compile benchmark's
MLP (three bnb NF4 layers dequantized + matmuls), eager vs torch.compile(fullgraph=True), per-call host
time, and a cProfile of the compiled calls. Run it with the three `src/` trees on PYTHONPATH."""

import torch

from tritonbits_harness import timing
from tritonbits_harness.bench import dequantize_4bit as bench

case = {"hd": 1024, "m": 4096, "dtype": "bf16", "tokens": 16}
thunks = bench.mlp_setup(case, torch.device("cuda"))
compiled = thunks["compile"]  # the triton_op (Inductor launches the kernel)
print(f"eager: {timing.host_us(thunks['eager'], n=500):.1f} us per call")
print(f"compiled: {timing.host_us(compiled, n=500):.1f} us per call")
timing.print_profile(compiled, 300, 25).sort_stats("cumulative").print_stats(25)

"""Where the host time of one eager call goes (run on a GPU machine): synchronize alone, a bare Triton
launch, tritonbits.dequantize_4bit piece by piece next to the Unsloth-style and bnb calls, dequant_bias,
and a cProfile of the dequantize calls. Run it with the three `src/` trees on PYTHONPATH."""

import cProfile
import pstats

import bitsandbytes.functional as F
import torch
import triton

import tritonbits
from tritonbits.ops import dequantize_4bit as dq
from tritonbits.quant_state import prepare
from tritonbits_harness import timing
from tritonbits_reference import baselines
from tritonbits_reference import bnb as RB


@triton.jit
def _empty(x_ptr, n):
    pass


def synced(fn):
    return lambda: (fn(), torch.cuda.synchronize())


w = RB.params4bit(torch.randn(4096, 1024).to(torch.bfloat16), device="cuda")
x = torch.empty(16, device="cuda")
acc = torch.randint(-100, 100, (16, 4096), dtype=torch.int32, device="cuda")
sa, sb = torch.rand(16, 1, device="cuda"), torch.rand(1, 4096, device="cuda")
acc128 = torch.randint(-100, 100, (128, 4096), dtype=torch.int32, device="cuda")
sa128, bias = torch.rand(128, 1, device="cuda"), torch.rand(4096, device="cuda").to(torch.bfloat16)
out128 = torch.empty(128, 4096, dtype=torch.bfloat16, device="cuda")
A, qs = w.data, w.quant_state
tritonbits.dequantize_4bit(A, qs)  # compiles the kernel
tritonbits.dequantize_4bit(A, qs)  # binds the launch
entry = prepare(A, qs)
bound = entry.launches.get("dequantize_4bit")
assert bound is not None, "the eager path did not bind its launch"
out = torch.empty(entry.state.shape, dtype=entry.state.dtype, device="cuda")
calls = {
    "synchronize": torch.cuda.synchronize,
    "empty triton launch (JITFunction)": lambda: _empty[(1,)](x, 16),
    "torch.empty": lambda: torch.empty(4096, 1024, dtype=torch.bfloat16, device="cuda"),
    "prepare (cache hit)": lambda: prepare(A, qs),
    "bound launch": lambda: bound(out),
    "launch_weight() (cached launcher)": lambda: dq.launch_weight(entry, out),
    "tritonbits.dequantize_4bit": lambda: tritonbits.dequantize_4bit(A, qs),
    "unsloth-style fast_dequantize": lambda: baselines.unsloth_fast_dequantize(A, qs),
    "bnb dequantize_4bit": lambda: F.dequantize_4bit(A, qs),
    "tritonbits.dequant_bias": lambda: tritonbits.dequant_bias(acc, sa, sb),
    "tritonbits.dequant_bias M=128 +bias": lambda: tritonbits.dequant_bias(acc128, sa128, sb, bias),
    "tritonbits.dequant_bias M=128 +bias out=": lambda: tritonbits.dequant_bias(acc128, sa128, sb, bias, out=out128),
}
for name in ("tritonbits.dequantize_4bit", "unsloth-style fast_dequantize", "bnb dequantize_4bit"):
    calls[f"{name} + sync"] = synced(calls[name])
host = {}
for name, fn in calls.items():
    host[name] = timing.host_us(fn)
    print(f"{name}: {host[name]:.1f} us")
bare = host["empty triton launch (JITFunction)"]
for name in [n for n in host if n.startswith("tritonbits.dequant_bias")]:  # issue 15: <= 1.3x, same run
    print(f"{name} / empty triton launch: {host[name] / bare:.2f}x (target <= 1.3x)")
prof = cProfile.Profile()
prof.enable()
for _ in range(3000):
    tritonbits.dequantize_4bit(A, qs)
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(14)

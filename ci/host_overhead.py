"""Where the host time of one eager call goes (run on a GPU machine): synchronize alone, a bare Triton
launch, tritonbits.dequantize_4bit piece by piece next to the Unsloth-style and bnb calls, dequant_bias,
tritonbits.linear_4bit at decode (M=1 and M=16, x [M, 1, 4096], W 14336x4096 nf4 nested bs64) next to
bnb.matmul_4bit on the same weight, and a cProfile of the dequantize and linear_4bit calls. Run it with the
three `src/` trees on PYTHONPATH. (The CPU-only Python cost of linear_4bit's pieces: ci/linear4bit_host_probe.py.)"""

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
import triton

import tritonbits
from tritonbits.ops import dequantize_4bit as dq
from tritonbits.ops import linear_4bit as L
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
# linear_4bit at decode: the eager plan (ops/linear_4bit.py, eager plans) is made on the first call and bound on
# the second; from then on a call is the key, the allocations and the bound launches
wl = RB.params4bit(torch.randn(14336, 4096).to(torch.bfloat16), device="cuda")
linear_names = []
for m in (1, 16):
    xm = torch.randn(m, 1, 4096, device="cuda").to(torch.bfloat16)
    tritonbits.linear_4bit(xm, wl)  # compiles, plans
    tritonbits.linear_4bit(xm, wl)  # binds
    if hasattr(L, "_prepare"):  # eager plans (absent in trees before them: the script also times those)
        plans = L._prepare(wl.data, wl.quant_state).launches.get("linear_4bit", {})
        steps_bound = [step.bound is not None for plan in plans.values() for step in plan.steps]
        print(f"linear_4bit M={m}: {len(plans)} plan(s) on the weight, steps bound: {steps_bound}")
    ours, theirs = f"tritonbits.linear_4bit M={m}", f"bnb.matmul_4bit M={m}"
    calls[ours] = lambda xm=xm: tritonbits.linear_4bit(xm, wl)
    calls[theirs] = lambda xm=xm: bnb.matmul_4bit(xm, wl.t(), quant_state=wl.quant_state)
    linear_names += [ours, theirs]
for name in ("tritonbits.dequantize_4bit", "unsloth-style fast_dequantize", "bnb dequantize_4bit", *linear_names):
    calls[f"{name} + sync"] = synced(calls[name])
# every call once a round, 15 rounds of 200 calls (timing.host_us_rounds): the min is the least disturbed round,
# the ratios below are of mins (the host is shared: a single long mean moved 4x between runs, log 20261124T0212Z)
taken = timing.host_us_rounds(calls)
host = {name: low for name, (low, _) in taken.items()}
for name, (low, median) in taken.items():
    print(f"{name}: {low:.1f} us (median round {median:.1f})")
bare = host["empty triton launch (JITFunction)"]
for name in [n for n in host if n.startswith("tritonbits.dequant_bias")]:  # issue 15: <= 1.3x, same run
    print(f"{name} / empty triton launch: {host[name] / bare:.2f}x (target <= 1.3x)")
timing.print_profile(lambda: tritonbits.dequantize_4bit(A, qs), 3000, 14)
for m in (1, 16):
    print(f"tritonbits.linear_4bit M={m} / bnb.matmul_4bit M={m}: "
          f"{host[f'tritonbits.linear_4bit M={m}'] / host[f'bnb.matmul_4bit M={m}']:.2f}x host time")  # fmt: skip
x1 = torch.randn(1, 1, 4096, device="cuda").to(torch.bfloat16)
timing.print_profile(lambda: tritonbits.linear_4bit(x1, wl), 3000, 14)

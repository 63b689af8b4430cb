"""Where the host time of one eager call goes (run on a GPU machine): synchronize alone, a bare Triton
launch, tritonbits.dequantize_4bit and dequant_bias with and without a sync, and a cProfile of the calls."""

import cProfile
import pstats
import time

import torch
import triton

import tritonbits
from tritonbits_reference import bnb as RB


@triton.jit
def _empty(x_ptr, n):
    pass


def per_call_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


w = RB.params4bit(torch.randn(4096, 1024).to(torch.bfloat16), device="cuda")
x = torch.empty(16, device="cuda")
acc = torch.randint(-100, 100, (16, 4096), dtype=torch.int32, device="cuda")
sa, sb = torch.rand(16, 1, device="cuda"), torch.rand(1, 4096, device="cuda")
print(f"synchronize: {per_call_us(torch.cuda.synchronize):.1f} us")
print(f"empty triton launch: {per_call_us(lambda: _empty[(1,)](x, 16)):.1f} us")
print(f"empty triton launch + sync: {per_call_us(lambda: (_empty[(1,)](x, 16), torch.cuda.synchronize())):.1f} us")
print(f"torch.empty: {per_call_us(lambda: torch.empty(4096, 1024, dtype=torch.bfloat16, device='cuda')):.1f} us")
dq = lambda: tritonbits.dequantize_4bit(w.data, w.quant_state)
print(f"dequantize_4bit: {per_call_us(dq):.1f} us")
print(f"dequantize_4bit + sync: {per_call_us(lambda: (dq(), torch.cuda.synchronize())):.1f} us")
db = lambda: tritonbits.dequant_bias(acc, sa, sb)
print(f"dequant_bias: {per_call_us(db):.1f} us")
prof = cProfile.Profile()
prof.enable()
for _ in range(3000):
    dq()
    db()
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(22)

"""Where the host time of one eager call goes (run on a GPU machine): synchronize alone, a bare Triton
launch, tritonbits.dequantize_4bit and dequant_bias piece by piece, and a cProfile of the calls."""

import cProfile
import pstats
import time

import torch
import triton

import tritonbits
from tritonbits.ops import dequantize_4bit as dq
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
A, qs = w.data, w.quant_state
tritonbits.dequantize_4bit(A, qs)  # compiles and caches the kernel
state, fields = dq._prepared(A, qs)
out = torch.empty(state.shape, dtype=state.dtype, device="cuda")
absmax, code2, absmax2, offset, bs2 = fields
key = next(iter(dq._launcher.compiled))
compiled = dq._launcher.compiled[key]
print(f"synchronize: {per_call_us(torch.cuda.synchronize):.1f} us")
print(f"empty triton launch: {per_call_us(lambda: _empty[(1,)](x, 16)):.1f} us")
print(f"torch.empty: {per_call_us(lambda: torch.empty(4096, 1024, dtype=torch.bfloat16, device='cuda')):.1f} us")
print(f"_prepared (cache hit): {per_call_us(lambda: dq._prepared(A, qs)):.1f} us")
print(f"launch(): {per_call_us(lambda: dq.launch(A, absmax, code2, absmax2, offset, out, 64, bs2, 'nf4')):.1f} us")
args = (A, absmax, dq.code_table("nf4", A.device), out, code2, absmax2, offset, out.numel(), A.numel())
consts = (32, 256, True, 32, 32, False, False)
stream = torch._C._cuda_getCurrentRawStream(0)
print(f"compiled[grid](...): {per_call_us(lambda: compiled[(2048, 1, 1)](*args, *consts, stream=stream)):.1f} us")
print(f"key of the args: {per_call_us(lambda: tuple(map(tritonbits._launcher._arg_key, args))):.1f} us")
dq_call = lambda: tritonbits.dequantize_4bit(A, qs)
print(f"dequantize_4bit: {per_call_us(dq_call):.1f} us")
print(f"dequantize_4bit + sync: {per_call_us(lambda: (dq_call(), torch.cuda.synchronize())):.1f} us")
db = lambda: tritonbits.dequant_bias(acc, sa, sb)
print(f"dequant_bias: {per_call_us(db):.1f} us")
prof = cProfile.Profile()
prof.enable()
for _ in range(3000):
    dq_call()
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(18)

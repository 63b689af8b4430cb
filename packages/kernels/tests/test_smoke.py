"""Smoke test that needs nothing but tritonbits, torch and triton (the `kernels-alone` session runs it in a
venv where reference, harness and bitsandbytes are not installed). The expected values come from the
format facts written out here in plain PyTorch, not from the kernel's own tables."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tritonbits

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]  # fmt: skip


def test_nf4_plain_absmax_fp32():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, blocksize = 333, 64
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.rand(-(-n // blocksize)) + 0.25
    state = tritonbits.QuantState(absmax=absmax.to(device), shape=torch.Size([n]), dtype=torch.float32,
                                  blocksize=blocksize, quant_type="nf4")  # fmt: skip
    got = tritonbits.dequantize_4bit(packed.to(device), state).cpu()
    codes = torch.stack([packed[:, 0] >> 4, packed[:, 0] & 15], 1).reshape(-1)[:n].long()
    want = torch.tensor(NF4)[codes] * absmax.repeat_interleave(blocksize)[:n]
    assert torch.equal(got, want)

"""Where a QLoRA step's host time goes per 4-bit layer (run on a GPU machine; issue 13's QLoRA step measured 0.96x
bnb, e2e record 20261124T023011Z): a bnb Linear4bit (nf4, nested, bf16 compute) with bf16 LoRA adapters (r=16) as
peft adds them, forward + backward at M = 4 x 512 tokens, bnb vs tritonbits enabled, interleaved rounds:
- synced: wall time of one forward + backward with a synchronize (GPU-bound at this size: the kernels' time);
- unsynced: 200 forward + backward back to back, one synchronize (the host time when the GPU keeps up);
then a cProfile (tottime) of the enabled path and of bnb's. Run it with the three `src/` trees on PYTHONPATH:

    python ci/qlora_layer_probe.py [--shapes 4096x14336,14336x4096] [--m 2048]
"""

from __future__ import annotations

import argparse
import time

import bitsandbytes as bnb
import torch

import tritonbits.integrations.bitsandbytes as tb_bnb
from tritonbits_harness import timing


def layer(k: int, n: int) -> torch.nn.Module:
    lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                            quant_type="nf4")  # fmt: skip
    lin.weight = bnb.nn.Params4bit(torch.randn(n, k) * 0.02, requires_grad=False, compress_statistics=True,
                                   quant_type="nf4")  # fmt: skip
    return lin.cuda()


class LoRA(torch.nn.Module):
    def __init__(self, base: torch.nn.Module, k: int, n: int, r: int = 16):
        super().__init__()
        self.base = base
        self.a = torch.nn.Linear(k, r, bias=False, dtype=torch.bfloat16, device="cuda")
        self.b = torch.nn.Linear(r, n, bias=False, dtype=torch.bfloat16, device="cuda")
        self.drop = torch.nn.Dropout(0.05)

    def forward(self, x):
        return self.base(x) + self.b(self.a(self.drop(x))) * 2.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="4096x14336,14336x4096")
    p.add_argument("--m", type=int, default=2048)
    a = p.parse_args()
    for shape in a.shapes.split(","):
        k, n = map(int, shape.split("x"))
        net = LoRA(layer(k, n), k, n)
        x = torch.randn(a.m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)

        def step(net=net, x=x):
            net(x).sum().backward()

        contexts = {"bnb": _null, "tritonbits": tb_bnb.enabled}
        for ctx in contexts.values():
            with ctx():
                step()
        synced = {name: [] for name in contexts}
        unsynced = {name: [] for name in contexts}
        for _ in range(7):
            for name, ctx in contexts.items():
                with ctx():
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    step()
                    torch.cuda.synchronize()
                    synced[name].append((time.perf_counter() - t0) * 1e6)
                    unsynced[name].append(timing.host_us(step, n=50, warmup=5))
        for name in contexts:
            print(f"K={k} N={n} M={a.m} {name}: synced {min(synced[name]):.0f} us, unsynced (host) "
                  f"{min(unsynced[name]):.0f} us per forward+backward")  # fmt: skip
        for name, ctx in contexts.items():
            with ctx():
                print(f"--- cProfile, {name}, K={k} N={n}")
                timing.print_profile(step, 200, 14)


def _null():
    import contextlib

    return contextlib.nullcontext()


if __name__ == "__main__":
    main()

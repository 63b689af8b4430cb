"""Where a QLoRA step's host time goes per 4-bit layer (run on a GPU machine; issue 13's QLoRA step measured 0.96x
bnb, e2e record 20261124T023011Z): a bnb Linear4bit (nf4, nested, bf16 compute) with bf16 LoRA adapters (r=16) as
peft adds them, forward + backward at M = 4 x 512 tokens, bnb vs tritonbits enabled, interleaved rounds:
- synced: wall time of one forward + backward with a synchronize (launch latency + the kernels' time);
- pipelined: 50 forward + backward back to back, one synchronize: per step, the larger of the host time and the
  GPU time (at M = 2048 the GPU's: the kernels' time without launch gaps);
- issue: the host time of 10 steps before their synchronize (how long the host takes to issue one step);
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
        self.drop = torch.nn.Dropout(0.0)  # peft's LoraConfig default, as the e2e QLoRA step uses

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
            x.grad = None
            net.zero_grad(set_to_none=True)

        def issue_us(step=step, n=10) -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            spent = (time.perf_counter() - t0) / n * 1e6
            torch.cuda.synchronize()
            return spent

        contexts = {"bnb": _null, "tritonbits": tb_bnb.enabled}
        for ctx in contexts.values():
            with ctx():
                step()
        synced = {name: [] for name in contexts}
        pipelined = {name: [] for name in contexts}
        issued = {name: [] for name in contexts}
        for _ in range(7):
            for name, ctx in contexts.items():
                with ctx():
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    step()
                    torch.cuda.synchronize()
                    synced[name].append((time.perf_counter() - t0) * 1e6)
                    pipelined[name].append(timing.host_us(step, n=50, warmup=5))
                    issued[name].append(issue_us())
        for name in contexts:
            print(f"K={k} N={n} M={a.m} {name}: synced {min(synced[name]):.0f} us, pipelined "
                  f"{min(pipelined[name]):.0f} us, issue {min(issued[name]):.0f} us per forward+backward")  # fmt: skip
        for name, ctx in contexts.items():
            with ctx():
                print(f"--- cProfile, {name}, K={k} N={n}")
                timing.print_profile(step, 200, 14)


def _null():
    import contextlib

    return contextlib.nullcontext()


if __name__ == "__main__":
    main()

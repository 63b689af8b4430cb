"""Benchmarks of tritonbits.linear_4bit (the fused 4-bit linear) against bnb.matmul_4bit, tritonbits'
dequantize_4bit + F.linear, and dense F.linear on the unquantized weight; and a QLoRA MLP block (gate/up/down
4-bit, bf16 LoRA adapters) forward + backward against the same block on bnb. Rendered by the report's generic
section (GB/s over the bytes model, % of copy, speed-ups)."""

from __future__ import annotations

import torch

import tritonbits

from .registry import Benchmark, register

# (K, N): Llama-3-8B attention/MLP and Llama-3-70B MLP widths (the list)
SHAPES = [(4096, 4096), (4096, 6144), (4096, 14336), (14336, 4096), (4096, 28672), (8192, 28672)]
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
QUICK_MS = (1, 4, 16, 256, 4096)
QUICK_SHAPES = ((4096, 14336), (14336, 4096))
BLOCKSIZE = 64


def parse_shapes(text: str | None) -> list[tuple[int, int]]:
    """(K, N) pairs from "KxN,KxN,..." (the probes' --shapes); SHAPES when text is None or empty."""
    if not text:
        return list(SHAPES)
    return [(int(k), int(n)) for k, n in (s.split("x") for s in text.split(","))]


def weight_bytes(k: int, n: int) -> int:
    """Packed 4-bit weight (0.5 byte each) + nested absmax (1 byte a block) + fp32 absmax2 (per 256 blocks)."""
    blocks = -(-n * k // BLOCKSIZE)
    return n * k // 2 + blocks + 4 * -(-blocks // 256)


def bytes_model(case: dict) -> int:
    """The fewest bytes a fused kernel moves: the packed weight and its absmax once, x read, out written."""
    m, k, n = case["m"], case["k"], case["n"]
    return weight_bytes(k, n) + (m * k + m * n) * DTYPES[case["dtype"]].itemsize


def cases(cpu: bool) -> list[dict]:
    if cpu:
        return [{"m": m, "k": 128, "n": 64, "dtype": d} for m in (1, 20) for d in DTYPES]
    return [{"m": m, "k": k, "n": n, "dtype": d} for d in DTYPES for k, n in SHAPES for m in MS]


def quick(case: dict) -> bool:
    return case["m"] in QUICK_MS and (case["k"], case["n"]) in QUICK_SHAPES


def _quantize(w: torch.Tensor):
    if w.device.type == "cuda":
        import bitsandbytes.functional as F

        return F.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    from tritonbits_reference import quantize_4bit

    return quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)


def setup(case: dict, device: torch.device) -> dict:
    from ..tolerance import assert_matmul

    dtype = DTYPES[case["dtype"]]
    m, k, n = case["m"], case["k"], case["n"]
    w = (torch.randn(n, k, device=device) * 0.02).to(dtype)
    q, state = _quantize(w)
    x = torch.randn(m, k, device=device).to(dtype)
    got = tritonbits.linear_4bit(x, q, state)
    if m * n * k <= 1 << 32 or device.type == "cpu":  # judged where the float64 oracle is affordable
        wd = tritonbits.dequantize_4bit(q, state)
        assert_matmul(got[:64], x[:64], wd)  # the benchmark refuses to time a wrong kernel
    thunks = {
        "tritonbits": lambda: tritonbits.linear_4bit(x, q, state),
        "dequant+F.linear": lambda: torch.nn.functional.linear(x, tritonbits.dequantize_4bit(q, state)),
    }
    if device.type == "cuda":
        import bitsandbytes as bnb

        thunks["bnb.matmul_4bit"] = lambda: bnb.matmul_4bit(x, q.t(), quant_state=state)
        thunks["dense F.linear"] = lambda: torch.nn.functional.linear(x, w)
    return thunks


register(Benchmark(
    name="linear_4bit",
    kernel="linear_4bit",
    description="out[M,N] = x[M,K] @ dequant(W[N,K]).T, nf4 nested blocksize 64; bytes = packed W + absmax + x + out",
    cases=cases,
    bytes_model=bytes_model,
    setup=setup,
    baselines=("bnb.matmul_4bit", "dequant+F.linear", "dense F.linear"),
    quick=quick,
))  # fmt: skip


# --- QLoRA MLP block: gate/up/down 4-bit + bf16 LoRA adapters, forward + backward -----------------------

QLORA = {"hidden": 4096, "inter": 14336, "rank": 16}


def qlora_cases(cpu: bool) -> list[dict]:
    if cpu:
        return [{"tokens": 8, "hidden": 64, "inter": 128, "rank": 4}]
    return [{"tokens": t, **QLORA} for t in (1024, 4096)]


class QLoRAMLP(torch.nn.Module):
    """SwiGLU MLP whose three projections are frozen 4-bit weights plus trainable LoRA adapters (A: r x in,
    B: out x r, bf16). `linear(x, packed, state)` is the 4-bit linear under test."""

    def __init__(self, weights: list, rank: int, linear, dtype, device, gen=None):
        super().__init__()
        self.weights = weights  # [(packed, quant_state)] for gate, up, down
        self.linear = linear
        self.lora = torch.nn.ParameterList()
        for _, st in weights:
            n, k = st.shape
            self.lora.append(torch.nn.Parameter((torch.randn(rank, k, device=device) * 0.01).to(dtype)))
            self.lora.append(torch.nn.Parameter((torch.randn(n, rank, device=device) * 0.01).to(dtype)))

    def proj(self, i: int, x):
        q, st = self.weights[i]
        return self.linear(x, q, st) + (x @ self.lora[2 * i].t()) @ self.lora[2 * i + 1].t()

    def forward(self, x):
        return self.proj(2, torch.nn.functional.silu(self.proj(0, x)) * self.proj(1, x))


def qlora_setup(case: dict, device: torch.device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    h, i, r, t = case["hidden"], case["inter"], case["rank"], case["tokens"]
    weights = [_quantize((torch.randn(o, k, device=device) * 0.02).to(dtype)) for o, k in ((i, h), (i, h), (h, i))]
    x = torch.randn(t, h, device=device).to(dtype).requires_grad_()

    def step(block):
        def run():
            block.zero_grad(set_to_none=True)
            x.grad = None
            block(x).float().square().mean().backward()

        return run

    ours = QLoRAMLP(weights, r, tritonbits.linear_4bit, dtype, device)
    thunks = {"tritonbits": step(ours)}
    if device.type == "cuda":
        import bitsandbytes as bnb

        bnb_linear = lambda x_, q, st: bnb.matmul_4bit(x_, q.t(), quant_state=st)
        theirs = QLoRAMLP(weights, r, bnb_linear, dtype, device)
        theirs.load_state_dict(ours.state_dict())
        thunks["bnb"] = step(theirs)
    return thunks


def qlora_bytes(case: dict) -> int:
    """The three packed weights read twice (forward, and backward for grad x)."""
    h, i = case["hidden"], case["inter"]
    return 2 * (2 * weight_bytes(h, i) + weight_bytes(i, h))


register(Benchmark(
    name="linear_4bit_qlora",
    kernel="linear_4bit",
    description="QLoRA SwiGLU MLP block (gate/up/down nf4 + bf16 LoRA r=16) forward + backward, vs bnb",
    cases=qlora_cases,
    bytes_model=qlora_bytes,
    setup=qlora_setup,
    baselines=("bnb",),
    modes=("launch",),
))  # fmt: skip

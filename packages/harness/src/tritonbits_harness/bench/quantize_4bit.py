"""Benchmarks of tritonbits.quantize_4bit (GB/s sweep) and of the 8-bit pair quantize_blockwise /
dequantize_blockwise. Before timing on CUDA, tritonbits must equal bnb CUDA byte for byte (a wrong kernel is
never timed). Baselines come from tritonbits_reference."""

from __future__ import annotations

import torch

import tritonbits
from tritonbits_reference import FP4_CODE, NF4_CODE, baselines

from .. import patterns, tolerance
from .registry import Benchmark, register

SHAPES = [(4096, 4096), (8192, 2048), (14336, 4096), (4096, 14336), (28672, 8192)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def bytes_model(case: dict) -> int:
    """n input elements read + n/2 packed bytes + absmax written (fp32 a block; nested: 1 byte a block, the
    fp32 absmax read back once, fp32 per 256 blocks)."""
    n = case["rows"] * case["cols"]
    blocks = -(-n // case["blocksize"])
    absmax = blocks + 4 * blocks + 4 * -(-blocks // 256) if case["nested"] else 4 * blocks
    return n * DTYPES[case["dtype"]].itemsize + n // 2 + absmax


def cases(cpu: bool) -> list[dict]:
    shapes = [(64, 256)] if cpu else SHAPES
    return [{"rows": r, "cols": c, "dtype": d, "quant_type": q, "nested": nested, "blocksize": 64}
            for (r, c) in shapes for d in DTYPES for q in ("nf4", "fp4") for nested in (False, True)]  # fmt: skip


def compiled_for_case():
    """torch.compile of the pure-PyTorch quantizer with static shapes, compiled for this case alone (dynamo
    reset first: no case inherits another's code or falls back to eager at the recompile limit)."""
    torch._dynamo.reset()
    return torch.compile(baselines.torch_quantize_4bit, dynamic=False)


QUICK_SHAPES = ((4096, 4096), (14336, 4096), (28672, 8192))


def quick(case: dict) -> bool:
    """The issue's targets: bf16 (nf4, nested and not) on the large shapes; fp4 and fp16 on one shape."""
    shape = (case["rows"], case["cols"])
    if shape not in QUICK_SHAPES:
        return False
    if case["dtype"] == "bf16":
        return case["quant_type"] == "nf4" or shape == (14336, 4096)
    return case["dtype"] == "fp16" and case["quant_type"] == "nf4" and shape == (14336, 4096)


def _same_as_bnb(x, case) -> None:
    import bitsandbytes.functional as F

    kw = {"blocksize": case["blocksize"], "quant_type": case["quant_type"], "compress_statistics": case["nested"]}
    packed, state = tritonbits.quantize_4bit(x, **kw)
    want_packed, want = F.quantize_4bit(x, **kw)
    same = torch.equal(state.absmax, want.absmax)
    try:  # byte-equal, or (fp32 input) neighbouring codes at near ties only: the tests' policy
        flat = x.reshape(-1).float().abs().reshape(-1, case["blocksize"]).amax(dim=1)
        code = torch.from_numpy({"nf4": NF4_CODE, "fp4": FP4_CODE}[case["quant_type"]])
        tolerance.assert_packed_4bit(packed, want_packed, x, flat, case["blocksize"], code)
    except AssertionError:
        same = False
    if case["nested"]:
        assert state.state2 is not None and want.state2 is not None and state.offset is not None
        same = same and torch.equal(state.offset, want.offset) and torch.equal(state.state2.absmax, want.state2.absmax)
    if not same:
        raise AssertionError(f"tritonbits != bnb on {case}: benchmark refuses to time a wrong kernel")


def setup(case: dict, device: torch.device) -> dict:
    import bitsandbytes.functional as F

    x = torch.randn(case["rows"], case["cols"], device=device, dtype=DTYPES[case["dtype"]])
    kw = {"blocksize": case["blocksize"], "quant_type": case["quant_type"], "compress_statistics": case["nested"]}
    dst = torch.empty(x.numel() // 2, dtype=torch.uint8, device=device)
    thunks = {
        "tritonbits": lambda: tritonbits.quantize_4bit(x, **kw),
        "pattern": lambda: patterns.compress(x.view(-1), dst),
    }
    if device.type == "cuda":
        _same_as_bnb(x, case)
        compiled = compiled_for_case()
        bs, qt, nested = case["blocksize"], case["quant_type"], case["nested"]
        tables = baselines.quantize_tables(qt, device)
        compiled(x, bs, *tables)  # compile now, not inside the first timing
        thunks.update({
            "bnb": lambda: F.quantize_4bit(x, **kw),
            "bnb-triton": lambda: baselines.bnb_triton_quantize_4bit(x, bs, qt, nested),
            "torch.compile": lambda: compiled(x, bs, *tables),  # the 4-bit step only, never the nested pass
        })  # fmt: skip
    return thunks


register(Benchmark(
    name="quantize_4bit",
    kernel="quantize_4bit",
    description="NF4/FP4, blocksize 64, nested or not: GB/s = (input + n/2 packed + absmax bytes) / time",
    cases=cases,
    bytes_model=bytes_model,
    setup=setup,
    baselines=("bnb", "bnb-triton", "torch.compile"),
    quick=quick,
))  # fmt: skip


# --- 8-bit blockwise pair ---------------------------------------------------------------------------

SIZES_8BIT = [2**24, 2**26, 2**28]
DTYPES_8BIT = ("bf16", "fp32")


def bytes_model_8bit(case: dict) -> int:
    """quantize: n elements read, n bytes + fp32 absmax written; dequantize: the reverse."""
    n = case["n"]
    return n * DTYPES[case["dtype"]].itemsize + n + 4 * -(-n // case["blocksize"])


def cases_8bit(cpu: bool) -> list[dict]:
    sizes = [2**14] if cpu else SIZES_8BIT
    return [{"n": n, "dtype": d, "blocksize": 4096} for n in sizes for d in DTYPES_8BIT]


def _setup_8bit(case: dict, device: torch.device, direction: str) -> dict:
    import bitsandbytes.functional as F

    x = torch.randn(case["n"], device=device, dtype=DTYPES[case["dtype"]])
    bs = case["blocksize"]
    q, state = tritonbits.quantize_blockwise(x, blocksize=bs)
    buf = torch.empty(case["n"], dtype=torch.uint8, device=device)
    if direction == "quantize":
        thunks = {"tritonbits": lambda: tritonbits.quantize_blockwise(x, blocksize=bs),
                  "pattern": lambda: patterns.narrow(x, buf)}  # fmt: skip
    else:
        thunks = {"tritonbits": lambda: tritonbits.dequantize_blockwise(q, state),
                  "pattern": lambda: patterns.narrow(q, x)}  # fmt: skip
    if device.type == "cuda":
        want_q, want_state = F.quantize_blockwise(x, blocksize=bs)
        same = torch.equal(q, want_q) and torch.equal(state.absmax, want_state.absmax)
        same = same and torch.equal(tritonbits.dequantize_blockwise(q, state), F.dequantize_blockwise(q, want_state))
        if not same:
            raise AssertionError(f"tritonbits != bnb on {case}: benchmark refuses to time a wrong kernel")
        if direction == "quantize":
            thunks["bnb"] = lambda: F.quantize_blockwise(x, blocksize=bs)
            thunks["bnb-triton"] = lambda: baselines.bnb_triton_quantize_blockwise(x, bs)
        else:
            thunks["bnb"] = lambda: F.dequantize_blockwise(q, want_state)
    return thunks


register(Benchmark(
    name="quantize_blockwise",
    kernel="quantize_blockwise",
    description="8-bit dynamic code, blocksize 4096: GB/s = (input + n codes + absmax bytes) / time",
    cases=cases_8bit,
    bytes_model=bytes_model_8bit,
    setup=lambda case, device: _setup_8bit(case, device, "quantize"),
    baselines=("bnb", "bnb-triton"),
))  # fmt: skip

register(Benchmark(
    name="dequantize_blockwise",
    kernel="dequantize_blockwise",
    description="8-bit dynamic code, blocksize 4096: GB/s = (n codes + absmax + output bytes) / time",
    cases=cases_8bit,
    bytes_model=bytes_model_8bit,
    setup=lambda case, device: _setup_8bit(case, device, "dequantize"),
    baselines=("bnb",),
))  # fmt: skip

"""A first call that is compiled: torch.compile runs each triton_op's body under FakeTensorMode when it traces the
op, so a per-device table (code tables, quantize encoder tables, linear_4bit's pair table) built there for the
first time failed (the 8-bit bucket table's construction is data-dependent: "unhashable type: non-nested SymInt"
on the H100) or came out fake (aten.to of the constant: "Please convert all Tensors to FakeTensors first").
The GPU sessions hid it: an eager test had built every table before the compiled ones ran.

Each body now builds what it reads through `_runtime.outside_fake` first. Here, on any device: the caches are
emptied, the op runs under FakeTensorMode with its kernel launch replaced by a no-op (the interpreter cannot run
a kernel on fake tensors; on CUDA, tracing never launches), and every table it reads must then be cached as a
real tensor equal to the eagerly built one.
"""

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import tritonbits
from tritonbits import formats
from tritonbits.ops import blockwise_8bit as b8
from tritonbits.ops import dequantize_4bit as dq
from tritonbits.ops import linear_4bit as L
from tritonbits.ops import quantize_4bit as q4
from tritonbits_harness.tolerance import assert_exact


@contextlib.contextmanager
def cold_caches():
    """Every per-device table cache emptied for the block, restored after (other tests hold the old objects)."""
    caches = (formats._tables, q4._TABLES, b8._TABLES)
    saved = tuple(dict(cache) for cache in caches)
    for cache in caches:
        cache.clear()
    L.pair_table.cache_clear()
    try:
        yield
    finally:
        for cache, old in zip(caches, saved, strict=True):
            cache.clear()
            cache.update(old)
        L.pair_table.cache_clear()


def assert_real(name, got, want):
    assert got is not None, f"{name} was not built by the op's body"
    assert not isinstance(got, FakeTensor), f"{name} was cached as a FakeTensor"
    assert torch.equal(got.cpu(), want.cpu()), f"{name} differs from the eagerly built table"


def eager_tables(device, quant_type):
    with cold_caches():
        return {
            "code": formats.code_table(quant_type, device).clone(),
            "dynamic": formats.code_table("dynamic", device).clone(),
            "encoder": q4.encoder_tables(quant_type, q4.ENCODER_DEFAULT, device)[0].clone(),
            "bucket8": b8.table_for(formats.code_table("dynamic", device), device).clone(),
            "pair": L.pair_table(quant_type, device).clone(),
        }


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_triton_op_bodies_build_real_tables_under_fake_mode(quant_type, device, gen, monkeypatch):
    x = torch.randn(18, 64, generator=gen).to(torch.bfloat16).to(device)
    device = x.device  # the caches' key: "cuda" is "cuda:<current>"
    want = eager_tables(device, quant_type)
    packed, state = tritonbits.quantize_4bit(x, quant_type=quant_type, compress_statistics=True)
    s2 = state.state2
    code8, xf = formats._VALUES["dynamic"].clone().to(device), x.float()
    w16 = torch.randn(1, 64, generator=gen).to(torch.bfloat16).to(device)
    for module, name in ((q4, "launch"), (b8, "launch_quantize"), (dq, "launch")):
        monkeypatch.setattr(module, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(L, "forward_2d", lambda x2, w, bias, **kwargs: x2.new_empty(x2.shape[0], w.state.shape[0]))
    ops = torch.ops.tritonbits
    with cold_caches():
        with FakeTensorMode() as mode:
            f = mode.from_tensor
            ops.quantize_4bit_triton_op(f(x), 64, quant_type, True)
        assert_real("encoder table", q4._TABLES.get((quant_type, q4.ENCODER_DEFAULT, device), (None,))[0],
                    want["encoder"])  # fmt: skip
        assert_real("8-bit bucket table", b8._TABLES.get(device), want["bucket8"])
        assert_real("dynamic code", formats._tables.get(("dynamic", device)), want["dynamic"])
    with cold_caches():
        with FakeTensorMode() as mode:
            f = mode.from_tensor
            ops.quantize_blockwise_triton_op(f(xf), f(code8), 256)
        assert_real("dynamic code", formats._tables.get(("dynamic", device)), want["dynamic"])
    with cold_caches():
        with FakeTensorMode() as mode:
            f = mode.from_tensor
            ops.dequantize_4bit_triton_op(f(packed), f(state.absmax), f(s2.code), f(s2.absmax), f(state.offset), 64,
                                          s2.blocksize, quant_type, list(state.shape), torch.bfloat16)  # fmt: skip
        assert_real(f"{quant_type} code", formats._tables.get((quant_type, device)), want["code"])
    with cold_caches():
        with FakeTensorMode() as mode:
            f = mode.from_tensor
            ops.linear_4bit_triton_op(f(w16), f(packed), f(state.absmax), f(s2.code), f(s2.absmax), f(state.offset),
                                      None, 64, s2.blocksize, quant_type, 18, 64, torch.bfloat16)  # fmt: skip
        assert_real(f"{quant_type} code", formats._tables.get((quant_type, device)), want["code"])
        assert L.pair_table.cache_info().currsize == 1, "the pair table was not built by the op's body"
        assert_real("pair table", L.pair_table(quant_type, device), want["pair"])


def _quantize_dequantize(x):
    packed, state = tritonbits.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    q, state8 = tritonbits.quantize_blockwise(x, blocksize=256)
    return tritonbits.dequantize_4bit(packed, state), tritonbits.dequantize_blockwise(q, state8)


def _linear(x, packed, state):
    return tritonbits.linear_4bit(x, packed, state)


@pytest.mark.gpu
def test_first_call_compiled_on_cuda(device, gen):
    """The real thing on CUDA: with every table cache empty, the first calls are compiled (fullgraph); the
    quantizers equal eager calls made afterwards byte for byte, linear_4bit as the other compile tests judge it."""
    x = torch.randn(96, 256, generator=gen).to(torch.bfloat16).to(device)
    xl = torch.randn(3, 256, generator=gen).to(torch.bfloat16).to(device)
    packed, state = tritonbits.quantize_4bit(torch.randn(64, 256, generator=gen).to(torch.bfloat16).to(device),
                                             quant_type="nf4", compress_statistics=True)  # fmt: skip
    with cold_caches():
        torch._dynamo.reset()
        got = torch.compile(_quantize_dequantize, fullgraph=True)(x)
        got_linear = torch.compile(_linear, fullgraph=True)(xl, packed, state)
    for g, want in zip(got, _quantize_dequantize(x), strict=True):
        assert_exact(g, want)
    torch.testing.assert_close(got_linear, _linear(xl, packed, state))  # as test_linear_4bit's compile test


def test_a_wrapper_traced_by_dynamo_puts_no_guard_on_the_table_cache(device, gen):
    """What failed on the H100 (a first quantize_blockwise compiled with fullgraph): dynamo traced the public
    wrapper's code_table lookup into a guard "key not in formats._tables", then the triton_op body, compiled
    before that guard was checked on the same frame, built the real table: "Guard failed on the same frame it
    was created". Here a backend does what the body does (builds every table eagerly) while the graph compiles;
    the compiled wrapper must run, give eager's bytes and add no recompile on the next call."""

    def backend(gm, example_inputs):
        for name in ("nf4", "fp4", "dynamic"):
            formats._tables.setdefault((name, x.device), formats._VALUES[name].to(x.device))
        return gm.forward

    x = torch.randn(4, 256, generator=gen).to(device)
    code8 = formats._VALUES["dynamic"].to(device)

    def wrapper(x):  # the tables the public wrappers look up, and an op on their values
        return x * formats.code_table("nf4", x.device)[3] + formats.code_table("dynamic", x.device)[200]

    with cold_caches():
        torch._dynamo.reset()
        compiled = torch.compile(wrapper, fullgraph=True, backend=backend)
        got = compiled(x)
        assert_exact(compiled(x), got)
        assert formats._tables[("dynamic", x.device)] is formats.code_table("dynamic", x.device)
    assert_exact(got, x * formats._VALUES["nf4"][3].to(device) + code8[200])


@pytest.mark.parametrize("name", ["nf4", "fp4", "dynamic"])
def test_code_table_op(name, device):
    """tritonbits::code_table, what code_table is while dynamo traces a caller: opcheck, and a copy of the cached
    table (never the cached object: an op's output must not alias what it does not take)."""
    torch.library.opcheck(torch.ops.tritonbits.code_table.default, (name, device))
    got = torch.ops.tritonbits.code_table(name, device)
    cached = formats.code_table(name, device)
    assert_exact(got, cached)
    assert got.data_ptr() != cached.data_ptr()

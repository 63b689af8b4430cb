"""tritonbits.quantize_blockwise / dequantize_blockwise: byte-equal with bitsandbytes CUDA (GPU) and with the
numpy oracle of bnb CUDA's kernels (interpreter)."""

import pytest
import torch

import tritonbits
import tritonbits_reference as R
from tritonbits import formats
from tritonbits_harness.tolerance import assert_exact


def expected_quantize(x, device, blocksize, nested=False):
    """(q, absmax, code, offset, absmax2): bnb CUDA on the GPU, the oracle under the interpreter."""
    if device.type == "cuda":
        import bitsandbytes.functional as F

        q, s = F.quantize_blockwise(x, blocksize=blocksize, nested=nested)
        return q, s.absmax, s.code, s.offset, s.state2.absmax if nested else None
    q, s = R.quantize_blockwise_cuda(x, blocksize=blocksize, nested=nested)
    return q, s["absmax"], s["code"], s.get("offset"), s.get("absmax2")


def expected_dequantize(q, absmax, code, blocksize, dtype, device):
    if device.type == "cuda":
        import bitsandbytes.functional as F

        return F.dequantize_blockwise(q, F.QuantState(absmax=absmax, code=code, blocksize=blocksize, dtype=dtype))
    return R.dequantize_blockwise_cuda(q, absmax, code, blocksize, dtype)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", formats.BLOCKSIZES_8BIT)
def test_quantize_equals_bnb_cuda(blocksize, nested, out_dtype, device, gen):
    shapes = [(3, 1025), (4096,)] + ([(4096, 4097)] if device.type == "cuda" else [])
    for shape in shapes:
        x = (torch.randn(shape, generator=gen) * 5).to(out_dtype).to(device)
        q, state = tritonbits.quantize_blockwise(x, blocksize=blocksize, nested=nested)
        want_q, want_absmax, want_code, want_offset, want_absmax2 = expected_quantize(x, device, blocksize, nested)
        assert_exact(q, want_q.to(device))
        assert_exact(state.absmax, want_absmax.to(device))
        assert_exact(state.code, want_code.to(device))
        assert state.blocksize == blocksize and state.dtype == out_dtype
        if nested:
            assert_exact(state.offset.reshape(()), want_offset.reshape(()).to(device))
            assert_exact(state.state2.absmax, want_absmax2.to(device))
        got = tritonbits.dequantize_blockwise(q, state)
        assert got.dtype == out_dtype and got.shape == x.shape
        if not nested:
            assert_exact(got, expected_dequantize(q, state.absmax, state.code, blocksize, out_dtype, device).to(device))


def test_search_edges(device):
    """Every code value, every midpoint, their fp32 neighbours, +-1, beyond 1, zeros, NaN: the binary search's
    tie and edge rules (absmax of every block is exactly 1, so the scaled value is x)."""
    code = formats.dynamic_code()
    mids = (code[1:] + code[:-1]) * 0.5
    pts = torch.cat([code, mids])
    values = torch.cat([pts, torch.nextafter(pts, torch.tensor(2.0)), torch.nextafter(pts, torch.tensor(-2.0)),
                        torch.tensor([0.0, -0.0, 1e-30, -1e-30, float("nan"), 1.0, -1.0])])  # fmt: skip
    values = values.clamp(-1.0, 1.0).nan_to_num(float("nan"))
    per_block = 63
    blocks = -(-values.numel() // per_block)
    padded = torch.cat([values, torch.zeros(blocks * per_block - values.numel())]).reshape(blocks, per_block)
    x = torch.cat([torch.ones(blocks, 1), padded], dim=1).reshape(-1).to(device)
    q, state = tritonbits.quantize_blockwise(x, blocksize=64)
    want_q, want_absmax, *_ = expected_quantize(x, device, 64)
    assert_exact(q, want_q.to(device))
    assert_exact(state.absmax, want_absmax.to(device))


def _table_probe_values() -> torch.Tensor:
    """Every threshold of dQuantize<0> and every bucket edge of the table encoder, each with its two fp32
    neighbours on both sides, both signs of the edges, and the specials."""
    from tritonbits.ops import blockwise_8bit as b8

    t = b8.dquantize_thresholds(formats.dynamic_code())
    edges = torch.arange(b8.TABLE_LO, b8.TABLE_HI + (1 << b8.TABLE_SHIFT), 1 << b8.TABLE_SHIFT, dtype=torch.int32)
    edges = edges.view(torch.float32)
    pts = torch.cat([t, edges, -edges])
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    near = [pts, torch.nextafter(pts, up), torch.nextafter(pts, down)]
    near += [torch.nextafter(near[1], up), torch.nextafter(near[2], down)]
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-30, -1e-30, 1.0, -1.0, 1.5, -1.5, 3e38, -3e38,
                            float("inf"), float("-inf"), float("nan")])  # fmt: skip
    return torch.cat([*near, special, -torch.tensor(float("nan")).reshape(1)])


def _table_encode_host(x: torch.Tensor) -> torch.Tensor:
    """The kernel's encode_8bit_table, op for op, on the host."""
    from tritonbits.ops import blockwise_8bit as b8

    table = b8.dynamic_table()
    key = b8.table_key(x)
    entry = table[((key >> b8.TABLE_SHIFT) + b8.TABLE_NEG).long()]
    code = (entry & 0xFF) + ((key & ((1 << b8.TABLE_SHIFT) - 1)) > (entry >> 8)).to(torch.int32)
    return torch.where(x != x, 0, code)


def test_table_encoder_exhaustive_edges_and_dense_sample(gen):
    """The table encoder (host emulation of its integer ops) equals the oracle's binary search on every
    threshold and bucket edge +-2 ulps, and on 2**22 random fp32 bit patterns (NaN, Inf, |x| > 1 included) plus
    2**21 uniform values in [-1, 1]. Monotone step functions that agree at every step and edge agree
    everywhere; ci/quantize_table_sweep.py checks all 2**32 bit patterns offline."""
    import numpy as np

    bits = torch.randint(-(2**31), 2**31, (2**22,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = torch.cat([_table_probe_values(), bits.view(torch.float32), torch.rand(2**21, generator=gen) * 2 - 1])
    want = torch.from_numpy(R.quantize_cuda.dquantize(formats.dynamic_code().numpy(), x.numpy()).astype(np.int32))
    got = _table_encode_host(x)
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, (
        f"first mismatches at x={x[bad[:5]].tolist()}: {got[bad[:5]].tolist()} vs {want[bad[:5]].tolist()}"
    )


def test_table_kernel_on_edges(device):
    """The kernel's table encoder (not the emulation) and the search on the thresholds and bucket edges: absmax
    of every block is exactly 1 (its first value), so the scaled value is x (NaN and Inf left out: they change
    the absmax)."""
    from tritonbits.ops import blockwise_8bit as b8

    values = _table_probe_values()
    values = values[values.isfinite() & (values.abs() <= 1)]
    per_block = 63
    blocks = -(-values.numel() // per_block)
    padded = torch.cat([values, torch.zeros(blocks * per_block - values.numel())]).reshape(blocks, per_block)
    x = torch.cat([torch.ones(blocks, 1), padded], dim=1).reshape(-1).to(device)
    code = formats.code_table("dynamic", device)
    for encoder in b8.ENCODERS:
        out = torch.empty(x.numel(), dtype=torch.uint8, device=device)
        absmax = torch.empty(blocks, device=device)
        b8.launch_quantize(x, code, out, absmax, 64, encoder=encoder)
        want_q, want_absmax, *_ = expected_quantize(x, device, 64)
        assert_exact(out, want_q.to(device))
        assert_exact(absmax, want_absmax.to(device))


def test_table_is_used_for_the_dynamic_code_only(device):
    """The dynamic code (by identity) takes the table encoder by default, any other code the search."""
    from tritonbits.ops import blockwise_8bit as b8

    x = torch.randn(300, device=device)
    out, absmax = torch.empty(300, dtype=torch.uint8, device=device), torch.empty(5, device=device)
    dyn = formats.code_table("dynamic", device)
    assert b8.default_encoder(dyn, x.device) == "table" and b8.plan_quantize(x, dyn, out, absmax, 64)[2]["TABLE"]
    assert b8.default_encoder(dyn.clone(), x.device) == "search"
    assert not b8.plan_quantize(x, dyn.clone(), out, absmax, 64)[2]["TABLE"]
    assert b8.plan_quantize(x, dyn, out, absmax, 64, encoder="table")[2]["TABLE"]
    assert not b8.plan_quantize(x, dyn, out, absmax, 64, encoder="search")[2]["TABLE"]
    with pytest.raises(ValueError, match="encoder"):
        b8.plan_quantize(x, dyn.clone(), out, absmax, 64, encoder="table")
    with pytest.raises(ValueError, match="encoder"):
        b8.plan_quantize(x, dyn, out, absmax, 64, encoder="smem")  # removed (see ENCODERS)
    with pytest.raises(ValueError, match="encoder"):
        b8.plan_quantize(x, dyn, out, absmax, 64, encoder="shared")


# ---------------------------------------------------------------------------------------------------
# The table encoder against the search (bnb's algorithm) and the oracle on special values


def _quantize_with(encoder, x, blocksize, offset=None):
    """(codes, absmax) of b8.launch_quantize with `encoder`, into outputs poisoned first."""
    from tritonbits.ops import blockwise_8bit as b8

    code = formats.code_table("dynamic", x.device)
    out = torch.full((x.numel(),), 0xAB, dtype=torch.uint8, device=x.device)
    absmax = torch.full((-(-x.numel() // blocksize),), float("nan"), device=x.device)
    b8.launch_quantize(x.reshape(-1), code, out, absmax, blocksize, offset, encoder=encoder)
    return out, absmax


def _special_cases(gen, dtype):
    """Random magnitudes, tails, and blocks of zeros, NaN, Inf and subnormals."""
    n = 4096 * 5 + 777  # several 4096-value tiles and a partial last tile
    x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 30, (n,), generator=gen).float())
    x[:64] = 0.0  # a block of zeros (absmax 0: every code is NaN's, index 0)
    x[64:128] = float("nan")  # a block of NaN (absmax -FLT_MAX)
    x[128:192] = torch.randn(64, generator=gen) * 1e-39  # subnormal fp32 (flushed: absmax 0)
    x[200:210] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38, 1.0])
    x[300] = float("inf")  # a block whose only infinity scales the rest to zeros and NaN
    x[4200:4260] = torch.randn(60, generator=gen) * 1e-6
    return {
        "random": x.to(dtype),
        "small": x[:300].to(dtype),
        "uniform": (torch.rand(9000, generator=gen) * 2 - 1).to(dtype),
    }


@pytest.mark.parametrize("blocksize", [64, 256, 1024, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_table_encoder_equals_search_and_oracle(dtype, blocksize, device, gen):
    """encoder="table" (on a GPU its gathers in inline PTX) gives the search's codes and absmax bit for bit, and
    the oracle's (bnb CUDA's on a GPU), on random magnitudes over 2**-30..2**30 with tail blocks, zeros, NaN, Inf
    and subnormal blocks."""
    for x in _special_cases(gen, dtype).values():
        x = x.to(device)
        got_q, got_absmax = _quantize_with("table", x, blocksize)
        search_q, search_absmax = _quantize_with("search", x, blocksize)
        assert_exact(got_q, search_q)
        assert_exact(got_absmax.view(torch.int32), search_absmax.view(torch.int32))  # NaN and -0.0 bits too
        want_q, want_absmax, *_ = expected_quantize(x, device, blocksize)
        assert_exact(got_q, want_q.reshape(-1).to(device))
        assert_exact(got_absmax, want_absmax.to(device))


def test_table_encoder_with_offset(device, gen):
    """The nested step's form (x - offset[0], the 4-bit quantizer's absmax minus its mean) through the table
    encoder equals the search's."""
    from tritonbits.ops import blockwise_8bit as b8

    x = torch.rand(3 * 4096 + 100, generator=gen).to(device) * 3
    offset = x.mean()
    want = _quantize_with("search", x, 256, offset)
    got = _quantize_with("table", x, 256, offset)
    assert_exact(got[0], want[0])
    assert_exact(got[1], want[1])
    assert b8.plan_quantize(x, formats.code_table("dynamic", device), *want, 256, offset, encoder="table")[2][
        "SUB_OFFSET"
    ]


def test_oracle_search_is_nearest_code():
    """The oracle's binary search picks a nearest code entry for ordinary values (so it is not vacuous)."""
    code = formats.dynamic_code().numpy()
    x = torch.linspace(-1, 1, 5001).numpy()
    q = R.quantize_cuda.dquantize(code, x)
    dist = abs(code[q] - x)
    best = abs(code[None, :] - x[:, None]).min(axis=1)
    assert (dist <= best + 1e-7).all()


def test_custom_code_and_out(device, gen):
    code = torch.linspace(-1, 1, 256).to(device)
    x = torch.randn(2, 700, generator=gen).to(device)
    out = torch.full((2, 700), 0xAB, dtype=torch.uint8, device=device)
    absmax = torch.full((6,), float("nan"), device=device)
    q, state = tritonbits.quantize_blockwise(x, code=code, absmax=absmax, out=out, blocksize=256)
    assert q is out and state.absmax is absmax
    want_q, want_state = R.quantize_blockwise_cuda(x.cpu(), code=code.cpu(), blocksize=256)
    want_absmax = want_state["absmax"]
    assert_exact(q.cpu(), want_q)
    assert_exact(absmax.cpu(), want_absmax)
    deq = torch.full((2, 700), float("nan"), dtype=torch.bfloat16, device=device)
    state.dtype = torch.bfloat16
    assert tritonbits.dequantize_blockwise(q, state, out=deq) is deq
    assert_exact(deq.cpu(), R.dequantize_blockwise_cuda(q.cpu(), absmax.cpu(), code.cpu(), 256, torch.bfloat16))


def test_non_contiguous_and_empty(device, gen):
    x = torch.randn(96, 130, generator=gen).to(device)
    q, state = tritonbits.quantize_blockwise(x.t(), blocksize=64)
    q2, state2 = tritonbits.quantize_blockwise(x.t().contiguous(), blocksize=64)
    assert_exact(q, q2)
    assert_exact(state.absmax, state2.absmax)
    q, state = tritonbits.quantize_blockwise(torch.empty(0, 3, device=device), blocksize=64)
    assert q.shape == (0, 3) and q.dtype == torch.uint8 and state.absmax.shape == (0,)
    assert tritonbits.dequantize_blockwise(q, state).shape == (0, 3)


BAD_Q = [
    ("int input", lambda d: {"A": torch.ones(64, dtype=torch.int64, device=d)}, TypeError, "A"),
    ("bool input", lambda d: {"A": torch.ones(64, dtype=torch.bool, device=d)}, TypeError, "A"),
    ("blocksize 32", lambda d: {"blocksize": 32}, ValueError, "blocksize"),
    ("code size", lambda d: {"code": torch.zeros(255, device=d)}, ValueError, "code"),
    ("code dtype", lambda d: {"code": torch.zeros(256, dtype=torch.float16, device=d)}, TypeError, "code"),
    ("out size", lambda d: {"out": torch.empty(63, dtype=torch.uint8, device=d)}, ValueError, "out"),
    ("out dtype", lambda d: {"out": torch.empty(64, dtype=torch.int8, device=d)}, TypeError, "out"),
    ("out strided", lambda d: {"out": torch.empty(128, dtype=torch.uint8, device=d)[::2]}, ValueError, "out"),
    ("absmax size", lambda d: {"absmax": torch.empty(2, device=d)}, ValueError, "absmax"),
    ("absmax device", lambda d: {"absmax": torch.empty(1, device="meta")}, ValueError, "absmax"),
]


@pytest.mark.parametrize("case", BAD_Q, ids=[b[0] for b in BAD_Q])
def test_bad_quantize_arguments(case, device):
    _, make, exc, name = case
    with pytest.raises(exc, match=rf"\b{name}\b"):
        tritonbits.quantize_blockwise(**{"A": torch.randn(64, device=device), "blocksize": 64, **make(device)})


BAD_DQ = [
    ("no scales", lambda d: {}, ValueError, "absmax"),
    ("A float", lambda d: {"A": torch.zeros(64, device=d), "absmax": torch.ones(1, device=d)}, TypeError, "A"),
    ("absmax size", lambda d: {"absmax": torch.ones(2, device=d)}, ValueError, "absmax"),
    ("absmax dtype", lambda d: {"absmax": torch.ones(1, dtype=torch.float16, device=d)}, TypeError, "absmax"),
    ("blocksize", lambda d: {"absmax": torch.ones(1, device=d), "blocksize": 100}, ValueError, "blocksize"),
    ("out shape", lambda d: {"absmax": torch.ones(1, device=d), "out": torch.empty(32, device=d)}, ValueError, "out"),
    ("out overlaps", lambda d: {"absmax": torch.ones(1, device=d), "out": "alias"}, ValueError, "out"),
]


@pytest.mark.parametrize("case", BAD_DQ, ids=[b[0] for b in BAD_DQ])
def test_bad_dequantize_arguments(case, device):
    _, make, exc, name = case
    kwargs = {"A": torch.zeros(64, dtype=torch.uint8, device=device), "blocksize": 64, **make(device)}
    if kwargs.get("out") == "alias":
        buf = torch.zeros(64, device=device)
        kwargs["A"], kwargs["out"] = buf.view(torch.uint8)[:64], buf
    with pytest.raises(exc, match=rf"\b{name}\b"):
        tritonbits.dequantize_blockwise(**kwargs)


def test_opcheck(device, gen):
    x = torch.randn(4, 300, generator=gen).to(device)
    code = formats.code_table("dynamic", device)
    torch.library.opcheck(torch.ops.tritonbits.quantize_blockwise.default, (x, code, 256))
    q = torch.empty(4, 300, dtype=torch.uint8, device=device)
    absmax = torch.empty(5, device=device)
    torch.library.opcheck(torch.ops.tritonbits.quantize_blockwise.out, (x, code, 256, q, absmax))
    # opcheck runs the op on copies: q and absmax stay unwritten (NaN there fails opcheck's comparisons)
    q, absmax = tritonbits.quantize_blockwise(x, code=code, blocksize=256)[0], torch.rand(5, generator=gen).to(device)
    torch.library.opcheck(
        torch.ops.tritonbits.dequantize_blockwise.default, (q, absmax.abs(), code, 256, torch.bfloat16)
    )
    out = torch.empty(4, 300, device=device)
    torch.library.opcheck(torch.ops.tritonbits.dequantize_blockwise.out, (q, absmax.abs(), code, 256, out))
    torch.library.opcheck(torch.ops.tritonbits.absmax_mean.default, (absmax.abs(),))
    if device.type == "cuda":
        torch.library.opcheck(torch.ops.tritonbits.quantize_blockwise_triton_op.default, (x, code, 256))
        torch.library.opcheck(torch.ops.tritonbits.dequantize_blockwise_triton_op.default,
                              (q, absmax.abs(), code, 256, torch.float16))  # fmt: skip


def _round_trip(x):
    q, state = tritonbits.quantize_blockwise(x, blocksize=256)
    return tritonbits.dequantize_blockwise(q, state)


def test_compiles_fullgraph_cpu_ops(device, gen):
    x = torch.randn(8, 300, generator=gen).to(device)
    torch._dynamo.reset()
    assert_exact(torch.compile(_round_trip, fullgraph=True, backend="aot_eager")(x), _round_trip(x))


def _nested(x):
    q, state = tritonbits.quantize_blockwise(x, blocksize=64, nested=True)
    return q, state.absmax, state.offset, state.state2.absmax


def test_compiled_nested_offset_is_bnbs_mean(device, gen):
    """Nested: the offset is torch's eager absmax.mean() as bnb computes it, also under torch.compile (Inductor
    summed the mean in its own order: offsets 1 ulp off in about half of these sizes, and absmax2 with them)."""
    torch._dynamo.reset()
    compiled = torch.compile(_nested, fullgraph=True, dynamic=False)
    for blocks in (18, 21, 27, 33, 48, 60, 69, 72):
        x = torch.randn(blocks * 64, generator=gen).to(device)
        got = compiled(x)
        q, absmax, _, offset, absmax2 = expected_quantize(x, device, 64, nested=True)
        for g, e in zip(got, (q, absmax, offset, absmax2), strict=True):
            assert_exact(g.reshape(-1), e.reshape(-1).to(g.device))


@pytest.mark.gpu
def test_compiles_fullgraph(device, gen):
    x = torch.randn(1024, 1000, generator=gen).to(torch.bfloat16).to(device)
    torch._dynamo.reset()
    assert_exact(torch.compile(_round_trip, fullgraph=True)(x), _round_trip(x))
